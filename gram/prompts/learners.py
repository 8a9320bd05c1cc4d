"""CoOp (text context), VPT (visual tokens) and their joint form, one interface. [paper/sibling/ours]

- CoOp [sibling: Zhou et al.]: M learnable context vectors before the class name,
  `[BOS] ctx_1..ctx_M name suffix [EOS]`, unified (one context for all classes) or class-specific.
  Initialised at random or from the words of a template: `"a {} emoji"` gives ctx = the embeddings
  of "a" and the suffix "emoji", so that at initialisation the text features equal
  `get_text_features("a <name> emoji")`. At random, the prompt is CoOp's `"X X X X <name>."`: M
  vectors of N(0, 0.02²) and the suffix ".", which CoOp appends to every class name; a template's
  text after `{}` is kept as written (no "." is added to "a {} emoji").
- VPT [sibling: Jia et al.]: P learnable tokens after the class token of the vision transformer,
  shallow (first layer only) or deep (fresh tokens at every layer). Its class features are those of a
  fixed hard prompt (`template="a photo of a {}."`), or of the bare class name without one.
- Joint [abstract: "mutually enhanced" textual and visual prompts; the coupling is ours]: both, and
  optionally coupled: the visual tokens of every layer are a learned linear map of the text context
  (plus their own tokens), so one gradient step moves both towers together.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn

from gram.config import MethodParams
from gram.prompts.encoders import encode_image_prompted, encode_text_embeds, normalize


class _Frozen:
    """Holds the frozen CLIP outside the learner's parameter tree (θ stays only the prompts)."""

    def __init__(self, backbone):
        self.backbone = backbone


class PromptLearner(nn.Module):
    """Base: owns θ; text and image features of a frozen CLIP with the prompts spliced in."""

    def __init__(self, backbone):
        super().__init__()
        self._frozen = _Frozen(backbone)
        clip = backbone.model
        tc = clip.config.text_config
        self.context = tc.max_position_embeddings
        tok = backbone.tokenizer
        self.bos = tok.bos_token_id
        self.eos = tok.eos_token_id
        self.pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        self.n_ctx = 0
        self.prefix: list[int] = []  # fixed word ids between the context and the name (VPT's template)
        self.suffix_text = ""  # text after the class name, as the template writes it (" emoji", ".")
        self.suffix: list[int] = []  # its ids alone, kept whole when a long name is cut

    # -- the frozen model ---------------------------------------------------------------------
    @property
    def backbone(self):
        return self._frozen.backbone

    @property
    def clip(self):
        return self._frozen.backbone.model

    def theta(self) -> dict[str, torch.Tensor]:
        """θ: the learnable prompt tensors by name (what meta-learning updates)."""
        return dict(self.named_parameters())

    def word_ids(self, text: str) -> list[int]:
        return list(self.backbone.tokenizer(text, add_special_tokens=False)["input_ids"])

    def set_suffix(self, text: str) -> None:
        """The fixed text after the class name, as written, and its ids alone."""
        self.suffix_text = text
        self.suffix = self.word_ids(text) if text else []

    # -- text ---------------------------------------------------------------------------------
    def prompt_ids(self, names: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """ids [C, L] = [BOS] + M placeholders + prefix + name + suffix + [EOS] (+ padding), and EOS positions [C].

        The name and the suffix are tokenized together, as the hard prompt's text is (so "<name>." gives
        the ids of `tokenizer("<name>.")` even where a tokenizer joins a name's last character with the
        "."); a name too long for the context is cut and the suffix's own ids follow it whole."""
        rows, eos = [], []
        room = self.context - 2 - self.n_ctx - len(self.prefix) - len(self.suffix)
        if room < 1:
            raise ValueError(f"{self.n_ctx} context tokens, a prefix of {len(self.prefix)} and a suffix of "
                             f"{len(self.suffix)} leave no room for the class name in a context of {self.context}")
        for name in names:
            body = self.word_ids(name + self.suffix_text)
            if len(body) > room + len(self.suffix):
                body = self.word_ids(name)[:room] + self.suffix
            rows.append([self.bos] + [self.pad] * self.n_ctx + self.prefix + body + [self.eos])
            eos.append(len(rows[-1]) - 1)
        length = max(map(len, rows))
        ids = torch.tensor([r + [self.pad] * (length - len(r)) for r in rows])
        return ids, torch.tensor(eos)

    def context_vectors(self, theta: dict[str, torch.Tensor], n: int) -> torch.Tensor | None:
        """The text context for n prompts, [n, M, D], or None (no text prompt)."""
        return None

    def text_features(self, names: list[str], theta: dict[str, torch.Tensor] | None = None,
                      truncate: bool = True) -> torch.Tensor:
        """Class names (or captions) -> L2-normalised text features [C, E] at θ."""
        theta = self.theta() if theta is None else theta
        ids, eos = self.prompt_ids(names)
        dev = self.backbone.device
        ids, eos = ids.to(dev), eos.to(dev)
        emb = self.clip.text_model.embeddings.token_embedding(ids)  # [C, L, D]
        ctx = self.context_vectors(theta, len(names))
        if ctx is not None:
            emb = torch.cat([emb[:, :1], ctx.to(emb.dtype), emb[:, 1 + self.n_ctx:]], dim=1)
        return normalize(encode_text_embeds(self.clip, emb, eos, truncate))

    # -- images -------------------------------------------------------------------------------
    def visual_prompts(self, theta: dict[str, torch.Tensor]) -> tuple[torch.Tensor | None, bool]:
        return None, False

    def image_features(self, pixel_values: torch.Tensor, theta: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Preprocessed pixels [N, 3, H, W] -> L2-normalised image features [N, E] at θ."""
        theta = self.theta() if theta is None else theta
        prompts, deep = self.visual_prompts(theta)
        px = pixel_values.to(self.backbone.device, self.backbone.dtype)
        return normalize(encode_image_prompted(self.clip, px, prompts, deep))

    def logits(self, pixel_values: torch.Tensor, names: list[str],
               theta: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """[N, C]: CLIP's logit scale times the cosine of image and class features."""
        img = self.image_features(pixel_values, theta)
        txt = self.text_features(names, theta)
        return self.clip.logit_scale.exp().float() * img @ txt.T

    def forward(self, pixel_values: torch.Tensor, names: list[str]) -> torch.Tensor:
        return self.logits(pixel_values, names)


def _visual_tokens(clip, n_tokens: int, deep: bool, generator: torch.Generator | None) -> torch.Tensor:
    """[layers or 1, P, D] tokens, uniform in ±sqrt(6 / (3 * patch area + width)) (VPT's Xavier bound)."""
    vc = clip.config.vision_config
    layers = vc.num_hidden_layers if deep else 1
    bound = math.sqrt(6.0 / (3 * vc.patch_size ** 2 + vc.hidden_size))
    return (torch.rand(layers, n_tokens, vc.hidden_size, generator=generator) * 2 - 1) * bound


def _split_template(template: str) -> tuple[str, str]:
    """The words before "{}" (stripped) and the text after it, as written (" emoji": its space matters when
    it is tokenized together with the class name)."""
    if "{}" not in template:
        return template, ""
    before, after = template.split("{}", 1)
    return before.strip(), after.rstrip()


class CoOp(PromptLearner):
    """Learnable text context before the class name.

    Args:
        backbone: a loaded `gram.backbone.Backbone`.
        init: a template such as "a {} emoji" (context = its words before "{}", fixed suffix = the
            words after), or None for `n_ctx` random context vectors and CoOp's suffix "." (the prompt
            "X X X X <name>.").
        n_ctx: number of context vectors when `init` is None.
        class_specific: one context per class (then `text_features` takes the classes in order).
        n_classes: required with `class_specific`.
    """

    def __init__(self, backbone, init: str | None = "a {} emoji", n_ctx: int = 16, class_specific: bool = False,
                 n_classes: int | None = None, generator: torch.Generator | None = None):
        super().__init__(backbone)
        emb = self.clip.text_model.embeddings.token_embedding
        if init is not None:
            prefix, suffix = _split_template(init)
            ids = self.word_ids(prefix)
            if not ids:
                raise ValueError(f"CoOp init template {init!r} has no words before the class name")
            with torch.no_grad():
                ctx = emb(torch.tensor(ids, device=emb.weight.device)).float()  # [M, D]
        else:
            suffix = "."  # CoOp's prompt: " ".join(["X"] * M) + " " + name + "."
            ctx = torch.randn(n_ctx, emb.embedding_dim, generator=generator) * 0.02
        self.set_suffix(suffix)
        self.n_ctx = ctx.shape[0]
        if class_specific:
            if not n_classes:
                raise ValueError("class-specific CoOp needs n_classes")
            ctx = ctx.unsqueeze(0).repeat(n_classes, 1, 1)  # [M, D] -> [C, M, D]
        self.class_specific = class_specific
        self.ctx = nn.Parameter(ctx.to(emb.weight.device).clone())

    def context_vectors(self, theta, n):
        ctx = theta["ctx"]
        if self.class_specific:
            if ctx.shape[0] != n:
                raise ValueError(f"class-specific context has {ctx.shape[0]} classes, asked for {n}")
            return ctx
        return ctx.unsqueeze(0).expand(n, -1, -1)  # [M, D] -> [n, M, D]


class VPT(PromptLearner):
    """Learnable visual tokens after the class token: shallow (first layer) or deep (every layer).

    The class features are fixed: those of `template` (e.g. "a photo of a {}.", exactly
    `get_text_features` of the filled-in text) or, with None, of the bare class name."""

    def __init__(self, backbone, n_tokens: int = 4, deep: bool = False, template: str | None = None,
                 generator: torch.Generator | None = None):
        super().__init__(backbone)
        if template is not None:
            if "{}" not in template:
                raise ValueError(f"VPT template {template!r} has no {{}} for the class name")
            prefix, suffix = _split_template(template)
            self.prefix = self.word_ids(prefix) if prefix else []
            self.set_suffix(suffix)
        tokens = _visual_tokens(self.clip, n_tokens, deep, generator)
        self.deep = deep
        self.vpt = nn.Parameter(tokens.to(self.backbone.device))

    def visual_prompts(self, theta):
        return theta["vpt"], self.deep


class Joint(CoOp):
    """Text context and visual tokens together; optionally coupled (visual = own + W·text context)."""

    def __init__(self, backbone, init: str | None = "a {} emoji", n_ctx: int = 16, n_tokens: int = 4,
                 deep: bool = False, coupled: bool = True, generator: torch.Generator | None = None):
        super().__init__(backbone, init=init, n_ctx=n_ctx, generator=generator)
        vc = self.clip.config.vision_config
        tw = self.clip.config.text_config.hidden_size
        tokens = _visual_tokens(self.clip, n_tokens, deep, generator)
        self.deep, self.coupled, self.n_tokens = deep, coupled, n_tokens
        self.vpt = nn.Parameter(tokens.to(self.backbone.device))
        if coupled:
            # maps the mean text context to a shift of every visual token; starts at zero so the
            # joint learner begins as its two parts side by side
            self.couple = nn.Parameter(torch.zeros(tw, vc.hidden_size, device=self.backbone.device))

    def visual_prompts(self, theta):
        tokens = theta["vpt"]
        if self.coupled:
            shift = theta["ctx"].mean(0) @ theta["couple"]  # [D_text] @ [D_text, D_vis] -> [D_vis]
            tokens = tokens + shift
        return tokens, self.deep


def make_learner(bb, m: MethodParams, n_classes: int, seed: int):
    """The prompt learner of method config `m` (None for the linear probe)."""
    gen = torch.Generator().manual_seed(seed)
    if m.kind == "coop":
        return CoOp(bb, init=m.init, n_ctx=m.n_ctx, class_specific=m.class_specific, n_classes=n_classes,
                    generator=gen)
    if m.kind == "vpt":
        return VPT(bb, n_tokens=m.n_tokens, deep=m.deep, template=m.template, generator=gen)
    if m.kind == "joint":
        return Joint(bb, init=m.init, n_ctx=m.n_ctx, n_tokens=m.n_tokens, deep=m.deep, coupled=m.coupled,
                     generator=gen)
    return None
