"""Triton kernels (attention, contrastive loss). Import lazily: importing triton is slow and
must happen after TRITON_INTERPRET is decided."""
