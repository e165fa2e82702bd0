"""Pictures the trainer writes: the gallery of detections (gallery.py) and the training curves (plot_metrics.py)."""
