"""Training rows: read (:mod:`safeshape.datafiles`) and validate, render the policy's chat template, tokenise with
prompt-masked labels and per-token weights (SFT: 1, RS: the row's ``safe`` flag, DSS: STAR values mapped to tokens).

Row layouts (one JSON object per line):
- ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}`` whose last message is the
  assistant's response (loss only on that last message; earlier turns are prompt);
- TRL's prompt-completion rows, ``{"prompt": str, "completion": str}`` and their conversational form
  ``{"prompt": [messages], "completion": [messages ending with the assistant's]}`` (:func:`trl_row`);
- ``loss="rs"`` rows add ``"safe": true|false``;
- ``loss="dss"`` rows add ``"star_values": [float, ...]`` (one per chunk of the response) and
  ``"star_chunk_words": int``, as written by ``safeshape star``.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .datafiles import iter_jsonl, read_jsonl  # noqa: F401 -- re-exported: their old home
from .errors import SafeshapeError

if TYPE_CHECKING:  # torch is imported where it is used, so the CLI's --help stays light
    import torch

IGNORE_INDEX = -100
LOSSES = ("dss", "sft", "rs")
TRAIN_ON = ("last", "all")  # which assistant turns of a `messages` row carry loss


@dataclass
class Example:
    """One tokenised row. ``labels`` and ``weights`` are aligned with ``input_ids`` (not shifted)."""

    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    weights: list[float]  # 0 on prompt tokens
    line: int  # 1-based line in the data file
    truncated: bool = False  # cut at the end by max_len


def trl_row(row, where: str):
    """A TRL prompt-completion row in our layout (other rows as they are): ``{"prompt": str, "completion": str}``
    -> ``prompt``/``response``; ``{"prompt": [messages], "completion": [messages]}`` (TRL's conversational form)
    -> ``messages`` = prompt + completion. Every other field (``star_values``, ``safe``) is kept."""
    if not isinstance(row, dict) or "completion" not in row or "prompt" not in row or \
            "response" in row or "messages" in row:
        return row
    prompt, completion = row["prompt"], row["completion"]
    rest = {k: v for k, v in row.items() if k not in ("prompt", "completion")}
    if isinstance(prompt, str) and isinstance(completion, str):
        return {"prompt": prompt, "response": completion, **rest}
    if isinstance(prompt, list) and isinstance(completion, list) and completion:
        return {"messages": prompt + completion, **rest}
    raise SafeshapeError(f"{where}: TRL prompt-completion row: `prompt` and `completion` must both be strings, or "
                         "both lists of {role, content} messages (the conversational form), got "
                         f"{type(prompt).__name__} and {type(completion).__name__}")


def split_row(row: dict, where: str) -> tuple[list[dict], str]:
    """``(prompt_messages, response)`` of a ``prompt``/``response``, ``messages`` or TRL prompt-completion row."""
    row = trl_row(row, where)
    if "messages" in row:
        msgs = row["messages"]
        if (not isinstance(msgs, list) or len(msgs) < 2
                or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                           for m in msgs)):
            raise SafeshapeError(f"{where}: `messages` must be a list of at least two {{role, content}} objects "
                                 "with string values")
        if msgs[-1]["role"] != "assistant":
            raise SafeshapeError(f"{where}: the last message must be the assistant's response (role "
                                 f"'assistant'), not {msgs[-1]['role']!r}")
        return [dict(m) for m in msgs[:-1]], msgs[-1]["content"]
    if "prompt" in row and "response" in row:
        prompt, response = row["prompt"], row["response"]
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise SafeshapeError(f"{where}: `prompt` and `response` must be strings")
        return [{"role": "user", "content": prompt}], response
    raise SafeshapeError(f"{where}: a row needs `prompt` and `response`, `messages`, or TRL's `prompt` and "
                         f"`completion`; it has {sorted(row)}")


def _check_star(row: dict, response: str, where: str) -> tuple[list[float], int]:
    from .chunks import chunk_char_spans

    if "star_values" not in row or "star_chunk_words" not in row:
        missing = [k for k in ("star_values", "star_chunk_words") if k not in row]
        raise SafeshapeError(f"{where}: --loss dss needs STAR fields, missing {missing}; annotate the data with "
                             "`safeshape star` first (or train with --loss sft)")
    values, m = row["star_values"], row["star_chunk_words"]
    if not isinstance(m, int) or isinstance(m, bool) or m < 1:
        raise SafeshapeError(f"{where}: `star_chunk_words` must be a positive integer, not {m!r}")
    if (not isinstance(values, list)
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) and 0.0 <= v <= 1.0 for v in values)):
        raise SafeshapeError(f"{where}: `star_values` must be a list of numbers in [0, 1]")
    n_chunks = len(chunk_char_spans(response, m))
    if len(values) != n_chunks:
        raise SafeshapeError(f"{where}: `star_values` has {len(values)} values but the response has {n_chunks} "
                             f"chunks of {m} words; the STAR annotation does not belong to this response")
    if row.get("star_recipe", "exact") not in ("exact", "authors"):
        raise SafeshapeError(f"{where}: `star_recipe` must be 'exact' or 'authors', not {row['star_recipe']!r}")
    return [float(v) for v in values], m


def check_chat_tokenizer(tokenizer, source: str) -> None:
    """The trainer renders rows with the policy's chat template and needs character offsets (a fast tokenizer)."""
    if not getattr(tokenizer, "chat_template", None):
        raise SafeshapeError(f"{source}: the tokenizer has no chat template (tokenizer_config.json "
                             "`chat_template` or chat_template.jinja); the trainer renders rows with the policy's "
                             "own template, so use the aligned chat model's tokenizer")
    if not getattr(tokenizer, "is_fast", False):
        raise SafeshapeError(f"{source}: a fast tokenizer (tokenizer.json) is needed for token offsets")


def _render(tokenizer, prompt_msgs: list[dict], response: str, where: str) -> tuple[str, int, int, str]:
    """``(text, prompt_chars, response_start, response_as_rendered)`` of the templated conversation."""
    try:
        prompt_text = tokenizer.apply_chat_template(prompt_msgs, tokenize=False, add_generation_prompt=True)
        text = tokenizer.apply_chat_template(prompt_msgs + [{"role": "assistant", "content": response}],
                                             tokenize=False)
    except Exception as exc:  # jinja errors (e.g. role alternation) name nothing about the row
        raise SafeshapeError(f"{where}: the chat template failed on this row: {exc}") from None
    if not text.startswith(prompt_text):
        raise SafeshapeError(f"{where}: the chat template does not render the prompt (with the generation prompt) as "
                             "a prefix of the full conversation, so prompt tokens cannot be masked")
    # templates may trim the content; the rendered response keeps the same whitespace words
    for candidate in (response, response.strip()):
        start = text.find(candidate, len(prompt_text))
        if start >= 0:
            return text, len(prompt_text), start, candidate
    raise SafeshapeError(f"{where}: the response does not appear verbatim in the chat-templated text")


def _earlier_assistant_spans(tokenizer, messages: list[dict], text: str, where: str) -> list[tuple[int, int]]:
    """Character spans in ``text`` (the whole rendered conversation) of every assistant turn but the last: from the
    end of its generation prompt to the end of the turn as the template renders it."""
    spans = []
    for i, m in enumerate(messages[:-1]):
        if m["role"] != "assistant":
            continue
        try:
            before = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
            through = tokenizer.apply_chat_template(messages[:i + 1], tokenize=False)
        except Exception as exc:
            raise SafeshapeError(f"{where}: the chat template failed on the turns before message {i + 1}: {exc}"
                                 ) from None
        if not (text.startswith(before) and text.startswith(through) and len(through) > len(before)):
            raise SafeshapeError(f"{where}: --train-on all: the chat template does not render the conversation up to "
                                 f"message {i + 1} as a prefix of the whole, so its turn cannot be located "
                                 "(use --train-on last)")
        spans.append((len(before), len(through)))
    return spans


def encode_row(tokenizer, row: dict, loss: str, max_len: int, where: str, line: int = 0,
               train_on: str = "last") -> Example | None:
    """Tokenise one row; ``None`` when truncation to ``max_len`` leaves no response token. ``train_on="all"``
    puts loss on every assistant turn of a ``messages`` row, not only the last (sft and rs)."""
    import torch

    from .chunks import authors_token_weights, token_weights

    if train_on not in TRAIN_ON:
        raise SafeshapeError(f"train_on must be one of {TRAIN_ON}, not {train_on!r}")
    if train_on == "all" and loss == "dss":
        raise SafeshapeError("--train-on all: STAR values cover the last response only; train all assistant turns "
                             "with --loss sft or rs")
    row = trl_row(row, where)
    prompt_msgs, response = split_row(row, where)
    if loss == "dss":
        values, chunk_words = _check_star(row, response, where)
    elif loss == "rs":
        if not isinstance(row.get("safe"), bool):
            raise SafeshapeError(f"{where}: --loss rs needs a boolean `safe` flag on every row "
                                 f"({'missing' if 'safe' not in row else 'got ' + repr(row['safe'])})")
    elif loss != "sft":
        raise SafeshapeError(f"loss must be one of {LOSSES}, not {loss!r}")
    text, prompt_chars, response_start, rendered = _render(tokenizer, prompt_msgs, response, where)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # a token that straddles the prompt/response boundary is prompt: it carries no loss
    is_response = [start >= prompt_chars for start, _ in offsets]
    if train_on == "all" and "messages" in row:
        spans = _earlier_assistant_spans(tokenizer, row["messages"], text, where)
        is_response = [r or any(a <= start < b for a, b in spans) for (start, _), r in zip(offsets, is_response)]
    labels = [t if r else IGNORE_INDEX for t, r in zip(ids, is_response)]
    if loss == "dss" and row.get("star_recipe") == "authors":  # their boundaries: token lengths of each prefix's chat
        first = is_response.index(True) if True in is_response else len(ids)
        w = authors_token_weights(tokenizer, prompt_msgs, response, values, chunk_words, len(ids), first)
        weights = [float(x) if r else 0.0 for x, r in zip(w.tolist(), is_response)]
    elif loss == "dss":
        w = token_weights(offsets, response_start, rendered, values, chunk_words)
        weights = [float(x) if r else 0.0 for x, r in zip(torch.as_tensor(w).tolist(), is_response)]
    else:
        value = 1.0 if loss == "sft" or row["safe"] else 0.0
        weights = [value if r else 0.0 for r in is_response]
    truncated = len(ids) > max_len
    ids, labels, weights = ids[:max_len], labels[:max_len], weights[:max_len]
    # row t predicts token t+1, so token 0 never carries loss
    if not any(lab != IGNORE_INDEX for lab in labels[1:]):
        return None
    return Example(ids, labels, weights, line, truncated)


def load_examples(path: str | os.PathLike, tokenizer, loss: str, max_len: int, progress: bool = False,
                  split: str | None = None, train_on: str = "last") -> tuple[list[Example], list[int]]:
    """Tokenise every row of a data file or folder (:func:`safeshape.datafiles.read_rows`: JSONL, JSON, parquet,
    CSV, save_to_disk): ``(examples, dropped)``, ``dropped`` = the line (or row) numbers of rows whose response
    was cut off entirely by ``max_len`` (rows cut but kept have ``truncated`` set). Every row is validated before
    any is used; an error names the file and line (or row)."""
    from tqdm.auto import tqdm

    from .datafiles import read_rows

    unit, rows = read_rows(path, split)
    examples, dropped = [], []
    for line, row in tqdm(rows, desc="tokenise", unit="row", disable=not progress, leave=False):
        ex = encode_row(tokenizer, row, loss, max_len, f"{os.fspath(path)} {unit} {line}", line, train_on)
        if ex is None:
            dropped.append(line)
        else:
            examples.append(ex)
    if not examples:
        raise SafeshapeError(f"{os.fspath(path)}: no row has a response token within --max-len {max_len}")
    return examples, dropped


def rows_loss(loss: str) -> str:
    """The row format a training loss reads: deep-token reads its rows as sft does (no extra fields)."""
    return "sft" if loss == "deep-token" else loss


def drop_rejected(examples: list[Example]) -> list[Example]:
    """RS as the paper describes it: the rows the guard rejected (weight 0 on every token) are not trained on (the
    authors' released code keeps them with weight 0 instead: --rs-keep-rejected)."""
    return [e for e in examples if any(w > 0 for w in e.weights)]


def max_len_report(examples: list[Example], dropped: list[int], max_len: int) -> str | None:
    """One line saying what ``max_len`` did to the data (None when it changed nothing)."""
    cut = sum(e.truncated for e in examples)
    if not cut and not dropped:
        return None
    lines = ", ".join(map(str, dropped[:20])) + (f" and {len(dropped) - 20} more" if len(dropped) > 20 else "")
    text = f"--max-len {max_len}: {cut} row(s) cut at the end"
    return text + (f"; {len(dropped)} row(s) dropped, no response token left (lines {lines})" if dropped else "")


def collate(examples: list[Example], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: ``input_ids``, ``attention_mask``, ``labels``, ``weights`` (``[B, T]``)."""
    import torch

    width = max(len(e.input_ids) for e in examples)
    n = len(examples)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    labels = torch.full((n, width), IGNORE_INDEX, dtype=torch.long)
    weights = torch.zeros((n, width), dtype=torch.float32)
    for i, e in enumerate(examples):
        k = len(e.input_ids)
        input_ids[i, :k] = torch.tensor(e.input_ids)
        attention_mask[i, :k] = 1
        labels[i, :k] = torch.tensor(e.labels)
        weights[i, :k] = torch.tensor(e.weights)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels, "weights": weights}
