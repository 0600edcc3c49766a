"""DINOv2 self-supervised pretraining: backbone, heads, losses, data, schedules and the training system."""
