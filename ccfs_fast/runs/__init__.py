"""A run and the commands around it: configs and presets, the workspace, the curriculum, state and resume,
outputs, reports, export, evaluation, the teacher command."""
