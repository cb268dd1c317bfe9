"""The visual-word CAM network (docs/method.md): backbone -> pooled classifier, word histogram head,
word head. Ablations switch the pooling (HSPP or global average) and drop word heads by weight 0."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vwe.nets.backbone import Backbone, LoadReport, build_backbone
from vwe.nets.pooling import hybrid_pyramid_pool
from vwe.nets.words import LearnedCodebook, MemoryBankCodebook, encode_words

POOLINGS = ("hspp", "gap")


def mlsm(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Multi-label soft margin loss: mean over classes (and batch) of BCE with logits, in float32."""
    return F.multilabel_soft_margin_loss(logits.float(), targets.float())


class VWENet(nn.Module):
    """Backbone F (B, D, h, w); s = W_cls * pool(F); s_hist = W_a * H(F, V); s_word = W_b * GAP(F).

    pool is HSPP (the paper) or global average (`pooling="gap"`, the plain-CAM ablation). A word head
    whose loss weight is 0 is frozen and not computed: its output is None and its term is absent."""

    def __init__(self, backbone: Backbone, num_classes: int = 20, num_words: int = 256,
                 codebook: str = "learned", pool_levels: tuple[int, ...] = (1, 2, 4), pool_gamma: float = 2.0,
                 memory_rho: float = 1e-3, cls_weight: float = 1.0, hist_weight: float = 1.0,
                 word_weight: float = 1.0, decorrelation_weight: float = 0.0, pooling: str = "hspp") -> None:
        super().__init__()
        if pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {', '.join(POOLINGS)}, got {pooling!r}")
        d = backbone.out_channels
        self.backbone = backbone
        self.classifier = nn.Conv2d(d, num_classes, 1, bias=False)     # W_cls
        self.hist_head = nn.Conv2d(num_words, num_classes, 1, bias=False)  # W_a
        self.word_head = nn.Conv2d(d, num_words, 1, bias=False)        # W_b
        if codebook == "learned":
            self.codebook: nn.Module = LearnedCodebook(num_words, d)
        elif codebook == "memory":
            self.codebook = MemoryBankCodebook(num_words, d, memory_rho)
        else:
            raise ValueError(f"codebook must be 'learned' or 'memory', got {codebook!r}")
        self.memory_bank = codebook == "memory"
        self.pooling = pooling
        self.pool_levels, self.pool_gamma = tuple(pool_levels), pool_gamma
        self.weights = {"cls": cls_weight, "hist": 0.0 if self.memory_bank else hist_weight,
                        "word": word_weight,
                        "decorrelation": 0.0 if self.memory_bank else decorrelation_weight}
        self.load_report: LoadReport | None = None
        self._freeze_unused_heads()

    def _freeze_unused_heads(self) -> None:
        """A head whose loss has weight 0 gets no gradient: freeze it so DDP sees no unused parameter.
        In memory-bank mode this freezes W_a (the codebook there is a buffer)."""
        w = self.weights
        self.classifier.requires_grad_(w["cls"] > 0)
        self.hist_head.requires_grad_(w["hist"] > 0)
        self.word_head.requires_grad_(w["word"] > 0)
        if not self.memory_bank:
            self.codebook.requires_grad_(w["hist"] > 0 or w["decorrelation"] > 0)

    def head_modules(self) -> list[nn.Module]:
        """The new layers (trained at head_lr_mult x lr)."""
        return [self.classifier, self.hist_head, self.word_head, self.codebook]

    def pool(self, feats: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, 1, 1): the classifier's pooling."""
        if self.pooling == "gap":
            return feats.mean(dim=(2, 3), keepdim=True)
        return hybrid_pyramid_pool(feats, self.pool_levels, self.pool_gamma)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor | None]:
        feats = self.backbone(x)
        logits = self.classifier(self.pool(feats)).flatten(1)
        out: dict[str, torch.Tensor | None] = {"logits": logits, "hist_logits": None, "word_logits": None,
                                               "word_labels": None}
        use_hist, use_word = self.weights["hist"] > 0, self.weights["word"] > 0
        if not (use_hist or use_word):
            return out
        if self.memory_bank and self.training:
            self.codebook.sync_initial()  # every rank labels step 1 against rank 0's random codebook
        assignment, histogram, word_labels = encode_words(feats, self.codebook.weight)
        if self.memory_bank and self.training:
            # the published order: step 1 is labelled against the random codebook, which is then
            # replaced by features of this batch (no EMA at step 1); EMA from step 2 on
            if bool(self.codebook.initialised):
                self.codebook.update(feats, assignment.argmax(dim=1))
            else:
                self.codebook.initialise_from(feats)
        if use_hist:
            # The histogram holds counts of up to h x w; autocast would round them to bf16's 8 bits before
            # the head (a few hundred distinct values), so the head runs in its weights' dtype: float32, or
            # what DeepSpeed cast the weights to.
            with torch.autocast(histogram.device.type, enabled=False):
                out["hist_logits"] = self.hist_head(histogram.to(self.hist_head.weight.dtype)).flatten(1)
        if use_word:
            out["word_logits"] = self.word_head(feats.mean(dim=(2, 3), keepdim=True)).flatten(1)
            out["word_labels"] = word_labels
        return out

    def losses(self, out: dict, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """The unweighted terms present in this mode plus `loss`, their weighted sum (float32)."""
        terms = {"cls": mlsm(out["logits"], labels)}
        if out.get("hist_logits") is not None:
            terms["hist"] = mlsm(out["hist_logits"], labels)
        if out.get("word_logits") is not None:
            terms["word"] = mlsm(out["word_logits"], out["word_labels"])
        if self.weights["decorrelation"] > 0:
            terms["decorrelation"] = self.codebook.decorrelation_loss()
        terms["loss"] = sum(self.weights[k] * v for k, v in terms.items())
        return terms

    def cam(self, x: torch.Tensor) -> torch.Tensor:
        """relu(W_cls * F): (B, C, h, w) class activation maps; the word heads are skipped."""
        return F.relu(F.conv2d(self.backbone(x), self.classifier.weight))


def build_model(mcfg) -> VWENet:
    """VWENet from a `cfg.model` section (vwe.formats.config.ModelConfig)."""
    backbone, report = build_backbone(mcfg.backbone, pretrained=mcfg.pretrained, norm=mcfg.norm,
                                      detach_stage2=mcfg.detach_stage2,
                                      grad_checkpointing=mcfg.grad_checkpointing,
                                      channels_last=mcfg.channels_last)
    model = VWENet(backbone, num_classes=mcfg.num_classes, num_words=mcfg.num_words, codebook=mcfg.codebook,
                   pool_levels=tuple(mcfg.pool_levels), pool_gamma=mcfg.pool_gamma, memory_rho=mcfg.memory_rho,
                   cls_weight=mcfg.cls_weight, hist_weight=mcfg.hist_weight, word_weight=mcfg.word_weight,
                   decorrelation_weight=mcfg.decorrelation_weight, pooling=mcfg.pooling)
    model.load_report = report
    if mcfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def param_groups(model: nn.Module, lr: float, head_lr_mult: float, weight_decay: float) -> list[dict]:
    """SGD groups: backbone at lr (convolutions and BatchNorm gamma/beta), new layers (classifier,
    W_a, W_b, codebook) at lr * head_lr_mult; weight decay on every parameter, as the published code.
    Only parameters with requires_grad; empty groups are left out. Accepts a DDP-wrapped model."""
    net = getattr(model, "module", model)
    head_ids = {id(p) for m in net.head_modules() for p in m.parameters()}
    backbone, heads = [], []
    for p in net.parameters():
        if p.requires_grad:
            (heads if id(p) in head_ids else backbone).append(p)
    groups = [{"name": "backbone", "params": backbone, "lr": lr, "weight_decay": weight_decay},
              {"name": "heads", "params": heads, "lr": lr * head_lr_mult, "weight_decay": weight_decay}]
    return [g for g in groups if g["params"]]
