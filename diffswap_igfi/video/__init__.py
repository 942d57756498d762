"""Video face swap: faces tracked across frames, smoothed, swapped, streamed in chunks."""
