"""Loaders the scripts (and the benchmarks) share, with one-line errors."""

from __future__ import annotations

from typing import Any, Callable

from transformers import AutoTokenizer

from common.errors import UserError


def load_tokenizer(path: str, cache_dir: str | None = None, do_lower_case: bool = False,
                   needs: str | None = None) -> Any:
    """The fast (Rust) tokenizer of a folder or hub name; `do_lower_case` forces lower-casing (for an uncased
    vocabulary whose tokenizer does not already), `needs` says in the error what a slow one would break."""
    kwargs = {"do_lower_case": True} if do_lower_case else {}
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, cache_dir=cache_dir or None, **kwargs)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load a tokenizer from {path}: {str(err).splitlines()[0]}") from None
    if not getattr(tokenizer, "is_fast", False):
        raise UserError(f"the tokenizer in {path} has no fast (Rust) version" + (f"; {needs}" if needs else ""))
    return tokenizer


def model_saver(model: Any, tokenizer: Any = None, save_model: Callable[[Any, str], None] | None = None
                ) -> Callable[[str], None]:
    """`save(folder)` for checkpoints and the final model: the model's save_pretrained (or `save_model(model,
    folder)`, e.g. masked.save_masked_model), then the tokenizer's."""
    def save(folder: str) -> None:
        if save_model is not None:
            save_model(model, folder)
        else:
            model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
    return save
