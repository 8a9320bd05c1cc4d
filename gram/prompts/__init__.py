"""Prompt learners over a frozen `transformers.CLIPModel`: text (CoOp), visual (VPT), joint. [paper/ours]

GRAM is model-agnostic: it needs only the learnable prompt parameters θ, a loss and its gradient.
Every learner here is an `nn.Module` that owns θ and nothing else (the frozen CLIP is held outside
its parameter tree), so `dict(learner.named_parameters())` *is* θ and
`torch.func.functional_call(learner, theta, args)` evaluates the learner at any θ. One interface:

    learner.theta()                          -> {name: tensor}
    learner.text_features(names, theta)      -> [C, D] L2-normalised
    learner.image_features(pixels, theta)    -> [N, D] L2-normalised
    learner.logits(pixels, names, theta)     -> [N, C] (CLIP's logit scale times cosine)

The encoders in `gram.prompts.encoders` reproduce `get_text_features` / `get_image_features`
exactly when the prompts are the words of a template (text) or absent (visual); tests check it.
`make_learner(bb, method_params, ...)` builds the learner a method config names (tune, tpt and meta).
"""

from gram.prompts.learners import VPT, CoOp, Joint, PromptLearner, make_learner

__all__ = ["CoOp", "Joint", "PromptLearner", "VPT", "make_learner"]
