"""LoReFT (Wu et al., 2024, "ReFT: Representation Finetuning for Language Models"), hand-written.

In: a pretrained classifier. Out: the same model, frozen, with a low-rank edit of the hidden
state added after chosen transformer blocks (ReFT paper, Eq. 2):

    Phi(h) = h + R^T (W h + b - R h)

R (r x d) has orthonormal rows; W (r x d), b (r) are a plain linear map. The edit acts on the
OUTPUT of each chosen block, only at the first ``first_n`` and last ``last_n`` non-pad tokens
of every sequence (found from the attention mask, so left and right padding give the same
positions). On an image model (a ViT: CLS, then the patches in raster order) there is no
padding and no meaningful "last" patch: the first ``first_n`` positions (the CLS token) get the
first edit and the ``last_n`` positions right after them (the first patches) the second; with
the defaults, the CLS and first patch positions. Only the edits and the classification head train. The edit acts on activations,
so it cannot be merged into the weights: inference pays for it (a few r x d products per
intervened block).

How it is wired without wrapping the model (the model keeps its class and state-dict names):
a forward pre-hook on the backbone reads the attention mask of each call and computes which
positions are intervened; a forward hook on each chosen block applies the edit there. The
edit modules are children of their block (``<block>.loreft.{tied,first,last}``), so they are
ordinary parameters for the optimizer, ``count_parameters`` and the default save/load.

Two defects of the obvious implementation, avoided here:
* ``torch.nn.utils.parametrizations.orthogonal`` (Householder map, used for r < d) stores the
  signs of R's columns as the +-1 diagonal of its ``original`` parameter and reads them with
  ``.int()``. Decoupled weight decay (AdamW, which peftlab applies to every 2-D tensor)
  shrinks -1 to -0.99999, ``.int()`` truncates it to 0 and R becomes the zero matrix after
  one step: the edit silently vanishes. A first parametrization (``_SnapSigns``) rounds that
  diagonal back to exact signs, so decay only regularises the reflectors.
* ``use_trivialization=True`` (torch's default) keeps a d x d ``base`` buffer per edit that
  the checkpoint would have to store (d^2 floats instead of r d); it is switched off.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import orthogonal

from ..errors import ConfigError
from ..method_configs.loreft import LoreftConfig
from ..models import transformer_blocks
from . import register
from .base import Method

# ---------------------------------------------------------------------------------------
# Positions
# ---------------------------------------------------------------------------------------

NONE, FIRST, LAST = -1, 0, 1


def intervention_positions(attention_mask: torch.Tensor, first_n: int, last_n: int,
                           prompt_length: torch.Tensor | None = None) -> torch.Tensor:
    """(batch, seq) tensor: FIRST / LAST at the edited positions, NONE elsewhere (and at pads).

    Positions count non-pad tokens only, so padding on either side gives the same tokens.
    ``prompt_length`` (batch,): only each sequence's first that many non-pad tokens (its
    prompt, on a causal LM trained on prompt + target) count; the target is never edited.
    A sequence of n < first_n + last_n tokens is split so that no token is edited twice:
    the first group gets at most min(first_n, n // 2) tokens before the last group takes
    what it needs, then the first group takes the rest (n = 1: only the last token).
    """
    mask = attention_mask.bool()
    rank = mask.long().cumsum(dim=1) - 1  # index of each token among the non-pad ones
    if prompt_length is not None:
        mask = mask & (rank < prompt_length.to(rank.device).view(-1, 1))
    n = mask.sum(dim=1, keepdim=True)  # edited-span tokens per sequence
    last_k = torch.clamp(n - torch.clamp(n // 2, max=first_n), max=last_n)
    first_k = torch.clamp(n - last_k, max=first_n)
    pos = torch.full_like(rank, NONE)
    pos = torch.where(mask & (rank < first_k), FIRST, pos)
    pos = torch.where(mask & (rank >= n - last_k), LAST, pos)
    return pos


class _PositionTracker:
    """Forward pre-hook on the backbone: records the edited positions of the current call.

    On a causal LM (generative tasks) the edits cover the prompt only, as pyreft does for
    generation: in training the batch's ``prompt_length`` (taken from the model's call by
    ``take_prompt_length``) bounds them; in generation the prefill call holds the prompt alone,
    and the decoding calls (one new token over a cache) are never edited."""

    def __init__(self, first_n: int, last_n: int):
        self.first_n, self.last_n = first_n, last_n
        self.positions: torch.Tensor | None = None
        self.image = False  # the current call reads pixel values: positions follow from the block's output
        self.prompt_length: torch.Tensor | None = None

    def take_prompt_length(self, module: nn.Module, args: tuple, kwargs: dict):
        """Forward pre-hook on the causal LM: keeps and removes the batch's ``prompt_length``."""
        self.prompt_length = kwargs.pop("prompt_length", None)
        return args, kwargs

    def image_positions(self, shape: torch.Size, device: torch.device) -> torch.Tensor:
        """A ViT's edited positions: FIRST at the first ``first_n`` tokens (CLS), LAST at the
        ``last_n`` after them (the first patches)."""
        pos = torch.full(shape, NONE, dtype=torch.long, device=device)
        pos[:, :self.first_n] = FIRST
        pos[:, self.first_n:self.first_n + self.last_n] = LAST
        return pos

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        pixels = kwargs.get("pixel_values", args[0] if args and getattr(args[0], "dim", lambda: 0)() == 4 else None)
        self.image = pixels is not None
        if self.image:
            self.positions = None
            return
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1:  # HF backbones: (input_ids, attention_mask, ...)
            mask = args[1]
        ref = kwargs.get("input_ids", args[0] if args else None)
        if ref is None:
            ref = kwargs["inputs_embeds"][..., 0]
        if mask is None:  # no mask given: every token is real
            mask = torch.ones(ref.shape[:2], dtype=torch.long, device=ref.device)
        if mask.dim() != 2:
            raise ValueError(f"loreft needs a 2-D (batch, seq) attention mask, got shape {tuple(mask.shape)}")
        if mask.shape[1] != ref.shape[1]:  # a decoding step over the KV cache: generated tokens
            self.positions = torch.full(ref.shape[:2], NONE, dtype=torch.long, device=ref.device)
            return
        self.positions = intervention_positions(mask, self.first_n, self.last_n, self.prompt_length)


# ---------------------------------------------------------------------------------------
# The edit
# ---------------------------------------------------------------------------------------


class _SnapSigns(nn.Module):
    """Rounds the diagonal of the stored Householder parameter to exact +-1 (see module doc).

    The Householder map reads column signs from that diagonal (no gradient flows there), so
    this changes nothing but makes the sign immune to weight decay's shrinking.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(x.shape[-2], x.shape[-1], dtype=torch.bool, device=x.device)
        signs = torch.where(x >= 0, torch.ones_like(x), -torch.ones_like(x))
        return torch.where(eye, signs.detach(), x)

    def right_inverse(self, x: torch.Tensor) -> torch.Tensor:
        return x


class LoreftEdit(nn.Module):
    """h -> h + R^T (W h + b - R h), R with orthonormal rows (ReFT Eq. 2); while training,
    dropout on that whole output (``dropout_on="output"``, pyreft's) or on the added term only."""

    def __init__(self, d: int, r: int, dropout: float = 0.0, dtype=None, device=None, dropout_on: str = "output"):
        super().__init__()
        rotate = nn.Linear(d, r, bias=False, dtype=dtype, device=device)
        parametrize.register_parametrization(rotate, "weight", _SnapSigns())
        # orthonormal rows by construction (Householder product), whatever the optimizer does
        self.rotate = orthogonal(rotate, orthogonal_map="householder", use_trivialization=False)
        with torch.no_grad():  # start from a uniformly random orthonormal frame (via right_inverse)
            self.rotate.weight = nn.init.orthogonal_(torch.empty(r, d, dtype=dtype, device=device))
        self.source = nn.Linear(d, r, dtype=dtype, device=device)  # W h + b
        self.dropout = nn.Dropout(dropout)
        self.dropout_on = dropout_on

    @property
    def R(self) -> torch.Tensor:
        return self.rotate.weight

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        R = self.R  # computed once per call (the Householder product)
        edit = (self.source(h) - h @ R.T) @ R
        return self.dropout(h + edit) if self.dropout_on == "output" else h + self.dropout(edit)


class LoreftLayer(nn.Module):
    """The edits of one block; ``hook`` is its forward hook (edits the block output in place)."""

    def __init__(
        self,
        names: list[str],
        d: int,
        r: int,
        dropout: float,
        tracker: _PositionTracker,
        dtype=None,
        device=None,
        dropout_on: str = "output",
    ):
        super().__init__()
        for name in names:
            self.add_module(name, LoreftEdit(d, r, dropout, dtype=dtype, device=device, dropout_on=dropout_on))
        self._tracker = tracker  # shared with the backbone pre-hook (a plain object, no state)

    def edit(self, h: torch.Tensor) -> torch.Tensor:
        tracker = self._tracker
        pos = tracker.image_positions(h.shape[:2], h.device) if tracker.image else tracker.positions
        if pos is None or pos.shape != h.shape[:2]:
            raise RuntimeError(
                "loreft: no edited positions for this call; call the model (or its backbone) "
                "with its attention mask, not a single block"
            )
        pos = pos.to(h.device).unsqueeze(-1)
        if "tied" in self._modules:
            return torch.where(pos != NONE, self.tied(h), h)
        return torch.where(pos == FIRST, self.first(h), torch.where(pos == LAST, self.last(h), h))

    def hook(self, module: nn.Module, args: tuple, output):
        if isinstance(output, tuple):  # MPNet blocks return (hidden, attentions...)
            return (self.edit(output[0]), *output[1:])
        if hasattr(output, "last_hidden_state"):
            raise TypeError("loreft: a block returning a ModelOutput is not supported")
        return self.edit(output)


@register
class Loreft(Method):
    name = "loreft"
    family = "representation"
    config_cls = LoreftConfig
    mergeable = False  # acts on activations; the added latency is measured by evaluate
    description = "low-rank orthogonal edit of block outputs at the first/last tokens (ReFT)"

    def _layer_indices(self, model: nn.Module) -> list[int]:
        n = len(transformer_blocks(model))
        if self.config.layers == "all":
            return list(range(n))
        bad = [i for i in self.config.layers if i >= n]
        if bad:
            raise ConfigError(
                f"method 'loreft': layers {bad} do not exist (model has {n} blocks: 0..{n - 1})"
            )
        return sorted(self.config.layers)

    def _hidden_size(self, model: nn.Module) -> int:
        d = model.config.hidden_size
        if self.config.r > d:
            raise ConfigError(f"method 'loreft': r={self.config.r} exceeds the hidden size {d}")
        return d

    def apply(self, model: nn.Module) -> nn.Module:
        cfg = self.config
        blocks = transformer_blocks(model)
        if any(isinstance(m, LoreftLayer) for m in model.modules()):
            raise ConfigError("method 'loreft' applied twice to the same model")
        d = self._hidden_size(model)
        self.freeze(model)
        tracker = _PositionTracker(cfg.first_n, cfg.last_n)
        model.base_model.register_forward_pre_hook(tracker, with_kwargs=True)
        if getattr(model, "peftlab_causal_lm", False):
            model.register_forward_pre_hook(tracker.take_prompt_length, with_kwargs=True)
            model.peftlab_reads_prompt_length = True
        for i in self._layer_indices(model):
            block = blocks[i]
            ref = next(block.parameters())
            layer = LoreftLayer(
                cfg.edits_per_layer(), d, cfg.r, cfg.dropout, tracker, dtype=ref.dtype, device=ref.device,
                dropout_on=cfg.dropout_on,
            )
            block.add_module("loreft", layer)
            block.register_forward_hook(layer.hook)
        self.unfreeze_head(model)
        return model

    def expected_trainable_parameters(self, model: nn.Module) -> int:
        # per edit: R (r d) + W (r d) + b (r); one or two edits per chosen block; + head
        d, r = self._hidden_size(model), self.config.r
        per_edit = 2 * r * d + r
        edits = len(self._layer_indices(model)) * len(self.config.edits_per_layer())
        return edits * per_edit + self.head_parameters(model)
