"""mdlm-dmmd: few-step distillation of discrete diffusion language models (D-MMD and baselines)."""

__version__ = "0.1.0"
