"""Hot-path operators: attention dispatch and contrastive-loss kernels."""
