"""Checkpoint layouts: ``hf`` (the Hugging Face InstructBLIP directory, loaded into and exported from our model)
and ``lavis`` (LAVIS ``.pth`` files <-> Hugging Face names)."""
