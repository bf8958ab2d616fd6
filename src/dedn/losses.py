"""Training losses of DEDN (reconstruction; see docs/method.md).

``CE(object) + CE(scenario) + CE(fused) + lambda_kd * positive-guided KL + lambda_con * contrastive``,
all with ignore index 255. A method with a single output and no experts (the peer HSNet) is trained with
the plain cross-entropy of its logits, as its paper does. PFENet (``model.method: pfenet``):
``CE(final) + lambda_int * mean_i CE(scale i)`` over the Feature Enrichment Module's per-scale outputs
(intermediate supervision). HDMNet (``model.method: hdmnet``): ``CE(final) + lambda_corr * correlation
distillation`` (dedn.models.hdmnet.correlation_distillation).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dedn.config import LossConfig

IGNORE = 255


def positive_guided_kl(
    logits_a: Tensor, logits_b: Tensor, target: Tensor, temperature: float = 1.0, mode: str = "correct"
) -> Tensor:
    """Online mutual distillation between two experts, guided by the label.

    At each labelled pixel the *positive* expert - the one that puts more probability on the true label -
    teaches the other: ``T^2 * KL(stopgrad(p_teacher / T) || p_student / T)``, counted only where the
    teacher is right (its argmax is the label). ``mode="foreground"`` further restricts the term to
    ground-truth foreground pixels. Gradients reach only the student at each pixel.

    logits_*: (B, 2, H, W); target (B, H, W) in {0, 1, 255}. Returns the mean over counted pixels (0 when
    there are none).
    """
    valid = target != IGNORE
    label = target.clamp(max=1).long()
    p_a = logits_a.softmax(dim=1)
    p_b = logits_b.softmax(dim=1)
    on_label_a = p_a.gather(1, label.unsqueeze(1)).squeeze(1)
    on_label_b = p_b.gather(1, label.unsqueeze(1)).squeeze(1)
    a_teaches = on_label_a >= on_label_b  # (B, H, W)
    teacher_logits = torch.where(a_teaches.unsqueeze(1), logits_a, logits_b).detach()
    student_logits = torch.where(a_teaches.unsqueeze(1), logits_b, logits_a)
    # the teacher's argmax, without the slow strided reduction over two channels (ties: background)
    teacher_right = (teacher_logits[:, 1] > teacher_logits[:, 0]).long() == label
    counted = valid & teacher_right
    if mode == "foreground":
        counted = counted & (target == 1)
    log_teacher = F.log_softmax(teacher_logits / temperature, dim=1)
    log_student = F.log_softmax(student_logits / temperature, dim=1)
    kl = (log_teacher.exp() * (log_teacher - log_student)).sum(dim=1)  # (B, H, W)
    n = counted.sum()
    if n == 0:
        return kl.sum() * 0.0
    return (kl * counted).sum() / n * temperature**2


def background_prototypes(embedding: Tensor, bg: Tensor, grid: int) -> tuple[Tensor, Tensor]:
    """Support background pooled on a grid x grid layout: (N, C, h, w), (N, 1, h, w) ->
    prototypes (N, grid*grid, C) and a validity mask (N, grid*grid) (cells with background)."""
    pooled = F.adaptive_avg_pool2d(embedding * bg, grid)  # (N, C, g, g)
    area = F.adaptive_avg_pool2d(bg, grid)  # (N, 1, g, g)
    protos = (pooled / area.clamp_min(1e-6)).flatten(2).transpose(1, 2)
    return protos, area.flatten(1) > 1e-3


def prototype_contrast(
    query_embedding: Tensor,
    query_target: Tensor,
    fg_prototype: Tensor,
    support_embedding: Tensor,
    support_bg: Tensor,
    temperature: float = 0.1,
    grid: int = 4,
) -> Tensor:
    """Pixel-to-prototype InfoNCE on the object expert's embedding.

    Query foreground pixels are pulled to the support foreground prototype and pushed from the support
    background prototypes; query background pixels are pulled to the background prototypes (all of them
    count as positives) and pushed from the foreground prototype.

    query_embedding (B, C, h, w); query_target (B, H, W) {0, 1, 255}; fg_prototype (B, C);
    support_embedding (B, K, C, h, w); support_bg (B, K, 1, h, w).
    """
    b, c, h, w = query_embedding.shape
    k = support_embedding.shape[1]
    fg_frac = F.adaptive_avg_pool2d((query_target == 1).float().unsqueeze(1), (h, w)).flatten(1)
    bg_frac = F.adaptive_avg_pool2d((query_target == 0).float().unsqueeze(1), (h, w)).flatten(1)
    bg_protos, bg_valid = background_prototypes(
        support_embedding.flatten(0, 1), support_bg.flatten(0, 1), grid
    )
    bg_protos = bg_protos.reshape(b, k * grid * grid, c)
    bg_valid = bg_valid.reshape(b, k * grid * grid)
    q = F.normalize(query_embedding.flatten(2), dim=1)  # (B, C, hw)
    fg_sim = torch.einsum("bcq,bc->bq", q, F.normalize(fg_prototype, dim=1)) / temperature  # (B, hw)
    bg_sim = torch.einsum("bcq,bpc->bqp", q, F.normalize(bg_protos, dim=2)) / temperature  # (B, hw, P)
    bg_sim = bg_sim.masked_fill(~bg_valid.unsqueeze(1), float("-inf"))
    all_sim = torch.cat([fg_sim.unsqueeze(2), bg_sim], dim=2)  # (B, hw, 1 + P)
    log_norm = torch.logsumexp(all_sim, dim=2)
    has_bg = bg_valid.any(dim=1, keepdim=True)  # (B, 1)
    fg_anchor = (fg_frac > 0.5) & has_bg
    bg_anchor = (bg_frac > 0.5) & has_bg
    loss_fg = (log_norm - fg_sim)[fg_anchor]
    # a background pixel's positives are all background prototypes (a scene has many background parts)
    loss_bg = (log_norm - torch.logsumexp(bg_sim, dim=2))[bg_anchor]
    terms = torch.cat([loss_fg, loss_bg])
    if terms.numel() == 0:
        return query_embedding.sum() * 0.0
    return terms.mean()


def dedn_loss(out: dict, target: Tensor, cfg: LossConfig, expert_names: list[str]) -> dict[str, Tensor]:
    """All loss terms for one batch; ``total`` is what is optimised. target: (B, H, W)."""
    if "experts" not in out:
        # one output, no experts (HSNet): the plain cross-entropy, no distillation or contrast
        ce = F.cross_entropy(out["logits"], target, ignore_index=IGNORE)
        return {"ce": ce, "total": ce}
    terms: dict[str, Tensor] = {}
    experts = out["experts"]
    for name in expert_names:
        terms[f"ce_{name}"] = cfg.expert_ce * F.cross_entropy(experts[name], target, ignore_index=IGNORE)
    if len(expert_names) > 1 and "probability" in out and cfg.fused_ce > 0:
        log_p = out["probability"].clamp_min(1e-6).log()
        terms["ce_fused"] = cfg.fused_ce * F.nll_loss(log_p, target, ignore_index=IGNORE)
    if "gate_probability" in out and cfg.gate_ce > 0:
        log_g = out["gate_probability"].clamp_min(1e-6).log()
        terms["ce_gate"] = cfg.gate_ce * F.nll_loss(log_g, target, ignore_index=IGNORE)
    kd = cfg.distill
    if len(expert_names) == 2 and kd.mode != "off" and kd.weight > 0:
        a, b = (experts[n] for n in expert_names)
        terms["pkl"] = kd.weight * positive_guided_kl(a, b, target, kd.temperature, kd.mode)
    intermediate = out.get("intermediate")
    if intermediate and cfg.intermediate_ce > 0:
        size = target.shape[-2:]
        ces = [
            F.cross_entropy(
                F.interpolate(x, size, mode="bilinear", align_corners=False), target, ignore_index=IGNORE
            )
            for x in intermediate
        ]
        terms["ce_intermediate"] = cfg.intermediate_ce * torch.stack(ces).mean()
    aux = out.get("aux", {})
    if "correlations" in aux and cfg.correlation_kl > 0:
        from dedn.models.hdmnet import correlation_distillation

        terms["kl_correlation"] = cfg.correlation_kl * correlation_distillation(aux["correlations"], target)
    con = cfg.contrast
    if "object" in expert_names and con.weight > 0 and "query_embedding" in aux:
        terms["contrast"] = con.weight * prototype_contrast(
            aux["query_embedding"],
            target,
            aux["prototype"],
            aux["support_embedding"],
            aux["support_bg"],
            con.temperature,
            con.background_grid,
        )
    terms["total"] = sum(terms.values())
    return terms
