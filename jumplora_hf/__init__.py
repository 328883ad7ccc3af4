"""JumpLoRA continual learning (arXiv 2604.16171) for the Hugging Face stack."""

from .callback import JumpLoRATrainerCallback
from .config import THRESHOLD_MODES, JumpLoraConfig
from .data import ContinualDataCollator, ContinualTask, encode_task, exact_match_accuracy, normalize_answer
from .ella import ella_penalty
from .gate import hard_threshold, interpolation_gamma, jump_interpolated_delta, symmetric_jump_relu
from .layer import JumpLoraLinear, iter_jumplora_layers, set_interpolation_gamma
from .lifecycle import MergedTaskUpdate, begin_task, end_task
from .model import check_target_modules, get_jumplora_model, load_jumplora_adapter
from .thresholds import initialize_thresholds, threshold_statistics
from .trainer import METHODS, ContinualSeq2SeqConfig, ContinualSeq2SeqTrainer

__version__ = "0.1.0"
__all__ = [
    "METHODS",
    "THRESHOLD_MODES",
    "ContinualDataCollator",
    "ContinualSeq2SeqConfig",
    "ContinualSeq2SeqTrainer",
    "ContinualTask",
    "JumpLoRATrainerCallback",
    "JumpLoraConfig",
    "JumpLoraLinear",
    "MergedTaskUpdate",
    "begin_task",
    "check_target_modules",
    "ella_penalty",
    "encode_task",
    "end_task",
    "exact_match_accuracy",
    "get_jumplora_model",
    "hard_threshold",
    "initialize_thresholds",
    "interpolation_gamma",
    "iter_jumplora_layers",
    "jump_interpolated_delta",
    "load_jumplora_adapter",
    "normalize_answer",
    "set_interpolation_gamma",
    "symmetric_jump_relu",
    "threshold_statistics",
]
