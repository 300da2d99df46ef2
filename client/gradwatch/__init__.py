"""gradwatch: watch training jobs for exploding gradients."""
