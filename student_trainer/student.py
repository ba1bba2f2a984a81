"""Building the student: shapes, classes and variance head follow the teacher (or the data)."""

from __future__ import annotations

import torch

from common.config import StudentConfig
from common.models import build_network
from common.teachers.base import Teacher


def student_var_type(teacher: Teacher) -> str:
    """Learned-range variance when the teacher has a learned variance (L*_vlb trains it), else the teacher's."""
    return "learned_range" if teacher.learned_variance else teacher.var_type


def student_flags(cfg: StudentConfig, image_shape: tuple[int, int, int], learn_sigma: bool,
                  num_classes: int | None) -> dict:
    """The network flags: the user's, plus what the teacher (or data) fixes: image shape, classes, sigma head."""
    c, h, _ = image_shape
    k = num_classes
    fixed = {
        "adm": {"image_size": h, "in_channels": c, "learn_sigma": learn_sigma, "class_cond": k is not None,
                **({"num_classes": k} if k is not None else {})},
        "dit": {"input_size": h, "in_channels": c, "learn_sigma": learn_sigma, "num_classes": k},
        "mlp": {"image_size": h, "in_channels": c, "learn_sigma": learn_sigma, "num_classes": k},
    }[cfg.arch]
    return {**cfg.flags, **fixed}


def build_student(cfg: StudentConfig, image_shape: tuple[int, int, int], learn_sigma: bool,
                  num_classes: int | None) -> tuple[torch.nn.Module, dict]:
    """-> (network, its checkpoint config: arch, size, flags)."""
    flags = student_flags(cfg, image_shape, learn_sigma, num_classes)
    model = build_network(cfg.arch, cfg.size, flags)
    return model, {"arch": cfg.arch, "size": cfg.size, "flags": flags}


def build_student_for(cfg: StudentConfig, teacher: Teacher) -> tuple[torch.nn.Module, dict]:
    return build_student(cfg, teacher.image_shape, teacher.learned_variance, teacher.num_classes)
