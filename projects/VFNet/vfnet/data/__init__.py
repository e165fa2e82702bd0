"""Datasets: the synthetic shapes generator (pure) and, with Detectron2, their registration."""
