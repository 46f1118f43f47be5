"""minillm: how a pretrained language model becomes an assistant, from scratch in NumPy.

Chapters map to modules (see README.md): tensor/functional (autograd), nn/model/tokenizer
(transformer), tasks/evaluate/data (prompting, SFT), lora, quant/memory/optim (QLoRA),
train/reward, train/ppo, train/dpo, kernels (CUDA), pipeline/report.
"""
__version__ = "0.1.0"
