"""Class names -> prompts -> token ids, through the backbone's own tokenizer."""

import string
from typing import Mapping, Optional, Sequence, Union

import torch

from .backbones import get_tokenizer

DEFAULT_TEMPLATE = "a medical image showing {}."
# The embedded demo's images are chest X-rays.
DEMO_TEMPLATE = "a chest X-ray showing {}."
# --data sklearn-digits: the classes are the digits themselves.
DIGITS_TEMPLATE = "a photo of the handwritten digit {}."


def default_template(data: Optional[str]) -> str:
    """The prompt template when none is given: the demo's for ``data=None``, the digits' for
    ``sklearn-digits``, the generic medical one otherwise."""
    if data is None:
        return DEMO_TEMPLATE
    return DIGITS_TEMPLATE if data.startswith("sklearn-digits") else DEFAULT_TEMPLATE


def check_template(template: str) -> None:
    """Refuse a prompt template unless it has exactly one bare ``{}`` and no other replacement field.

    ``{x}``, ``{0}``, ``{:>5}`` and ``{!r}`` would raise KeyError or IndexError
    inside ``str.format`` (or format the class name in some other way); literal
    braces are written ``{{`` and ``}}``.

    Raises:
        ValueError: naming the template and the field that is wrong.
    """
    if not isinstance(template, str):
        raise ValueError(f"the prompt template must be a string with one '{{}}'; got {template!r}")
    try:
        fields = [(name, spec, conv) for _, name, spec, conv in string.Formatter().parse(template) if name is not None]
    except ValueError as err:
        raise ValueError(f"the prompt template {template!r} is not a valid format string ({err}); write literal "
                         "braces as '{{' and '}}'") from None
    other = [f"{{{name}{'!' + conv if conv else ''}{':' + spec if spec else ''}}}" for name, spec, conv in fields
             if name or spec or conv]
    if other:
        raise ValueError(f"the prompt template {template!r} has the field {other[0]!r}; a template takes exactly "
                         "one bare '{}' (the class name) and no other fields; write literal braces as '{{' and '}}'")
    if len(fields) != 1:
        raise ValueError(f"the prompt template must contain exactly one '{{}}' (the class name); got {template!r}, "
                         f"which has {len(fields)}")


def class_prompts(
    class_names: Sequence[str], template: str = DEFAULT_TEMPLATE, descriptions: Optional[Mapping[str, str]] = None
) -> list:
    """One prompt per class: ``template.format(description or name)``.

    Args:
        class_names: the K class names, in label order.
        template: a format string with one ``{}``, e.g. ``"a chest X-ray showing {}."``.
        descriptions: optional class name -> longer description used in its place.

    Example:
        >>> class_prompts(["normal lungs", "pneumonia"], "a chest X-ray showing {}.")
        ['a chest X-ray showing normal lungs.', 'a chest X-ray showing pneumonia.']
    """
    if isinstance(class_names, str) or len(class_names) == 0:
        raise ValueError(f"class_names must be a non-empty list of class names; got {class_names!r}")
    check_template(template)
    descriptions = descriptions or {}
    unknown = sorted(set(descriptions) - set(class_names))
    if unknown:
        raise ValueError(f"descriptions name classes that do not exist: {unknown}; classes are {list(class_names)}")
    prompts = [template.format(descriptions.get(name, name)) for name in class_names]
    check_distinct(class_names, prompts)
    return prompts


def check_distinct(class_names: Sequence[str], prompts: Sequence[str]) -> None:
    """Refuse two classes whose prompts are the same text: the model could never tell them apart.

    Raises:
        ValueError: naming both classes and the prompt they share.
    """
    seen = {}
    for name, prompt in zip(class_names, prompts):
        # Case and spacing make no difference to most tokenizers (CLIP's lower-cases and splits on spaces).
        key = " ".join(prompt.lower().split())
        if key in seen:
            raise ValueError(f"classes {seen[key]!r} and {name!r} get the same prompt {prompt!r}, so the model "
                             "cannot tell them apart; rename one, or give one a description")
        seen[key] = name


def tokenize_prompts(
    prompts: Sequence[str],
    model: Union[str, dict] = "ViT-B-16",
    context_length: Optional[int] = None,
    pretrained: Optional[str] = None,
) -> torch.Tensor:
    """Token ids (K, n) for K prompts, through the text tower's own tokenizer.

    How far the padding is cut depends on the tower, so that the result is
    exact: a causal tower pooled at the end token (CLIP) and a tower that
    masks its padding (Hugging Face BERT/RoBERTa, BiomedCLIP) get n = the
    longest prompt, since no real token ever attends to the padding; a
    bidirectional tower without a mask (SigLIP) keeps the full fixed-length
    padding it was trained with, and NearlCLIP keeps that padding out of
    the USEformer context.

    Args:
        prompts: K non-empty strings.
        model: the backbone the prompts are for, as given to
            :func:`nearl_model.create_clip` (a name, ``"biomedclip"``, an
            ``hf-hub:`` id, a JSON config path or dict).
        context_length: the most tokens a prompt may have; the model
            config's context (77 for CLIP, 256 for BiomedCLIP) by default,
            and never more than it.
        pretrained: the weights the backbone was built with (see
            :func:`nearl_model.backbones.get_tokenizer`: offline, a bundled
            model without weights may fall back to a generated vocabulary).

    Returns:
        int64 token ids (K, n).

    Example:
        >>> tokenize_prompts(["a chest X-ray showing pneumonia."], "ViT-B-16").shape
        torch.Size([1, 9])
    """
    if isinstance(prompts, str) or len(prompts) == 0:
        raise ValueError(f"prompts must be a non-empty list of strings; got {prompts!r}")
    empty = [i for i, p in enumerate(prompts) if not isinstance(p, str) or not p.strip()]
    if empty:
        raise ValueError(f"prompts at positions {empty} are empty or not strings")
    if context_length is not None and (not isinstance(context_length, int) or context_length < 2):
        raise ValueError(f"context_length must be an int >= 2; got {context_length!r}")
    tokenizer, text_cfg = get_tokenizer(model, None, pretrained)
    limit = text_cfg.get("context_length", 77)
    tokens = tokenizer(list(prompts), context_length=min(context_length or limit, limit)).long()
    if text_cfg.get("hf_model_name"):
        # The tower masks its padding: cut after the last non-pad token of the longest prompt.
        real = tokens != tokenizer.tokenizer.pad_token_id
        n = int((real.int().cumsum(dim=1) * real).argmax(dim=1).max()) + 1
    elif text_cfg.get("no_causal_mask") or text_cfg.get("embed_cls"):
        return tokens.contiguous()
    elif text_cfg.get("pool_type", "argmax") == "argmax":
        n = int(tokens.argmax(dim=1).max()) + 1
    elif text_cfg.get("pool_type") == "eos":
        n = int((tokens == text_cfg.get("eos_id", 2)).int().argmax(dim=1).max()) + 1
    else:
        # Pooled at a fixed position: every token may reach it, keep them all.
        return tokens.contiguous()
    return tokens[:, :n].contiguous()
