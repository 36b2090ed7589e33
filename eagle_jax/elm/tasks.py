"""ELM tasks: prompts with embedding placeholders, targets from the environment LLM, padded batches.

Task set (a CPU-sized subset of ELM's 24 movie tasks + 1 user task, PAPER_SPEC.md section 4.3):

| task | slots | what the ELM is asked (``{0}``, ``{1}``: embedding placeholders) |
|---|---|---|
| ``summary`` | movie | "Summarize the movie {0} in two sentences." |
| ``positive_review`` | movie | "Write a short positive review of the movie {0}." |
| ``negative_review`` | movie | "Write a short negative review of the movie {0}." |
| ``pitch`` | movie | "Write a two-sentence pitch for the movie {0}." |
| ``comparison`` | movie, movie | "Compare the movies {0} and {1} in two sentences." |
| ``user_profile`` | user | "Describe the movie taste of the viewer {0} in two sentences." |

Targets: the environment LLM (``env``; normally ``CachedClient`` over the local SmolLM2 sampler) is
asked the same question with the *real* information instead of the embedding: title and genres of
each movie, or the user's best and worst rated titles (``env.prompts.profile_prompt``). Every
request goes through the client with an explicit seed ``records_lib.derive_seed(seed, task, ids,
attempt)``, so the on-disk response cache answers a rerun; answers are cleaned
(``env.prompts.clean_paragraph``: preambles, labels and repeated sentences removed) and cut to
whole sentences that fit ``target_tokens - 1`` tokens (then ``<|im_end|>`` is appended, so the ELM
learns to stop); an answer that does not parse is retried with a new seed.

Layout of a training row (``collate``), ``T = P + L``::

  columns [0, P):  the chat-formatted prompt, left-padded; placeholder ids at the soft positions
  columns [P, T):  the target ids, then right padding

``attention_mask`` is True on real tokens; ``slot_index`` is ``s * n + j`` at the position of soft
token ``j`` of embedding slot ``s`` and -1 elsewhere (``adapter.inject_soft_tokens``);
``loss_mask`` is True exactly on the target tokens (the tokens the loss predicts, all in
``[P, T)``), so the prompt, the placeholders and the padding never enter the loss. Because every
prompt ends at column ``P - 1`` the loss only needs logits of columns ``[P - 1, T - 1)``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from eagle_jax import prompts as prompts_lib
from eagle_jax.data import records as records_lib
from eagle_jax.env import client as client_lib
from eagle_jax.models.tokenizer import Tokenizer

ELM_SYSTEM = "You write short texts about movies."
ENV_SYSTEM = "You are a helpful assistant who writes short, concrete text about movies."
_MARK = re.compile(r"\x00(\d+)\x00")


@dataclasses.dataclass(frozen=True)
class Task:
  """One ELM task.

  Attributes:
    name: task id.
    domains: domain of each embedding slot (``adapter.DOMAINS``).
    elm_prompt: what the ELM reads; ``{0}``, ``{1}`` mark the embedding slots.
    env_instruction: what the environment LLM is asked after the real facts.
  """

  name: str
  domains: tuple[str, ...]
  elm_prompt: str
  env_instruction: str


TASKS: dict[str, Task] = {t.name: t for t in (
    Task("summary", ("movie",), "Summarize the movie {0} in two sentences.",
         "Summarize this movie in two sentences."),
    Task("positive_review", ("movie",), "Write a short positive review of the movie {0}.",
         "Write a short positive review of this movie in two sentences."),
    Task("negative_review", ("movie",), "Write a short negative review of the movie {0}.",
         "Write a short negative review of this movie in two sentences."),
    Task("pitch", ("movie",), "Write a two-sentence pitch for the movie {0}.",
         "Write a two-sentence pitch for this movie to a film studio."),
    Task("comparison", ("movie", "movie"), "Compare the movies {0} and {1} in two sentences.",
         "Compare these two movies in two sentences."),
    Task("user_profile", ("user",),
         "Describe the movie taste of the viewer {0} in two sentences.", ""),
)}


def get_task(name: str, field: str = "task") -> Task:
  if name not in TASKS:
    raise ValueError(f"{field}: unknown ELM task {name!r}; known: {sorted(TASKS)}")
  return TASKS[name]


@dataclasses.dataclass(frozen=True)
class Example:
  """One training or evaluation example.

  Attributes:
    task: task name.
    slots: index of each slot's entity in its domain table (item index or user index).
    target: target text ("" for evaluation-only examples).
  """

  task: str
  slots: tuple[int, ...]
  target: str = ""


# ---------------------------------------------------------------------------------------------------
# Prompts.


def elm_prompt_ids(tokenizer: Tokenizer, task: Task, n_tokens: int, *, placeholder_id: int,
                   fill: Sequence[str] | None = None) -> tuple[list[int], list[int]]:
  """Token ids of the ELM prompt (ChatML, ends with the assistant header) and its slot indices.

  Args:
    tokenizer: the decoder's tokenizer.
    task: the task.
    n_tokens: soft tokens per embedding slot.
    placeholder_id: token id written at soft positions (its embedding is replaced).
    fill: optional text per slot instead of an embedding (e.g. the title for the title-only
      baseline); then the prompt has no soft positions.

  Returns:
    ``(ids, slot_index)``, two lists of equal length; ``slot_index`` is -1 at text positions and
    ``s * n_tokens + j`` at soft token ``j`` of slot ``s``.
  """
  if fill is not None:
    if len(fill) != len(task.domains):
      raise ValueError(f"fill: task {task.name!r} has {len(task.domains)} slots, got {len(fill)}")
    content = task.elm_prompt.format(*fill)
  else:
    content = task.elm_prompt.format(*[f"\x00{s}\x00" for s in range(len(task.domains))])
  text = tokenizer.apply_chat_template(
      [{"role": "system", "content": ELM_SYSTEM}, {"role": "user", "content": content}])
  ids: list[int] = []
  slots: list[int] = []
  pos = 0
  for m in _MARK.finditer(text):
    piece = tokenizer.encode(text[pos:m.start()])
    ids += piece
    slots += [-1] * len(piece)
    s = int(m.group(1))
    ids += [placeholder_id] * n_tokens
    slots += [s * n_tokens + j for j in range(n_tokens)]
    pos = m.end()
  piece = tokenizer.encode(text[pos:])
  ids += piece
  slots += [-1] * len(piece)
  return ids, slots


def movie_facts(title: str, genres: Sequence[str]) -> str:
  return f"Movie: {title}\nGenres: {', '.join(genres) if genres else 'unknown'}"


def env_messages(task: Task, example: Example, ratings, user_titles: Mapping[int, Any] | None
                 ) -> list[dict[str, str]]:
  """Chat messages asking the environment LLM for the target of ``example`` (real facts)."""
  if task.name == "user_profile":
    if user_titles is None or example.slots[0] not in user_titles:
      raise ValueError(f"user_profile: no liked/disliked titles for user {example.slots[0]}")
    u = user_titles[example.slots[0]]
    return prompts_lib.profile_prompt(u.liked, u.disliked)
  facts = [movie_facts(str(ratings.titles[i]), ratings.genres[i]) for i in example.slots]
  if len(facts) == 2:
    body = f"Movie A:\n{facts[0]}\n\nMovie B:\n{facts[1]}"
  else:
    body = facts[0]
  return [{"role": "system", "content": ENV_SYSTEM},
          {"role": "user", "content": f"{body}\n\n{task.env_instruction}"}]


# ---------------------------------------------------------------------------------------------------
# Targets.


def clean_target(text: str, tokenizer: Tokenizer, max_tokens: int, *, min_words: int = 5
                 ) -> list[int]:
  """Target ids: cleaned answer, whole sentences within ``max_tokens - 1`` tokens, then eos.

  A trailing fragment without end punctuation is dropped when a complete sentence precedes it.
  If even the first sentence is too long it is cut to ``max_tokens`` tokens (no eos).

  Raises:
    prompts.ParseError: fewer than ``min_words`` words remain.
  """
  para = prompts_lib.clean_paragraph(text, min_words=min_words, max_sentences=4)
  sentences = [s for s in re.split(r"(?<=[.!?])\s+", para) if s]
  if len(sentences) > 1 and not re.search(r"[.!?][\"')\]]*$", sentences[-1]):
    sentences = sentences[:-1]
  kept: list[int] = []
  for n in range(len(sentences), 0, -1):
    ids = tokenizer.encode(" ".join(sentences[:n]))
    if len(ids) <= max_tokens - 1:
      kept = ids + [tokenizer.eos_id]
      break
  if not kept:
    kept = tokenizer.encode(sentences[0])[:max_tokens]
  return kept


async def generate_targets(client, examples: Sequence[Example], ratings, *,
                           tokenizer: Tokenizer, target_tokens: int, sampling: Mapping[str, Any],
                           seed: int, retries: int, user_titles=None,
                           ) -> tuple[list[Example], list[dict[str, Any]]]:
  """Asks the environment LLM for every example's target (one ``generate`` call per attempt).

  Args:
    client: a ``SamplingBackend`` (``CachedClient`` so reruns come from disk).
    examples: examples without targets.
    ratings: ``data.RatingsData`` (titles, genres).
    tokenizer: the decoder's tokenizer (for cutting targets to ``target_tokens``).
    target_tokens: L, the longest target in tokens (eos included).
    sampling: ``temperature``, ``top_p``, ``repetition_penalty``, ``no_repeat_ngram``,
      ``max_tokens`` of the requests.
    seed: base seed of ``records_lib.derive_seed``.
    retries: extra attempts with a new seed for an answer that does not parse.
    user_titles: user index -> ``data.catalog.User`` (for ``user_profile``).

  Returns:
    ``(examples with targets (failures dropped), provenance records)``.
  """
  todo = list(range(len(examples)))
  texts: dict[int, str] = {}
  records: list[dict[str, Any]] = []
  for attempt in range(retries + 1):
    if not todo:
      break
    prompts, params = [], []
    for i in todo:
      ex = examples[i]
      prompts.append(env_messages(get_task(ex.task), ex, ratings, user_titles))
      params.append(client_lib.SamplingParams(
          max_tokens=int(sampling["max_tokens"]), temperature=float(sampling["temperature"]),
          top_p=float(sampling["top_p"]), repetition_penalty=float(sampling["repetition_penalty"]),
          no_repeat_ngram=int(sampling["no_repeat_ngram"]),
          seed=records_lib.derive_seed(seed, "elm", ex.task, *ex.slots, attempt), chat=True))
    answers = await client.generate(prompts, params)
    failed = []
    for i, p, q, a in zip(todo, prompts, params, answers):
      rec = {"task": examples[i].task, "slots": list(examples[i].slots), "prompt": p,
             "params": q.to_dict(), "text": a.text, "parsed": True}
      try:
        clean_target(a.text, tokenizer, target_tokens)
        texts[i] = a.text
      except prompts_lib.ParseError as e:
        rec["parsed"], rec["error"] = False, str(e)
        failed.append(i)
      records.append(rec)
    todo = failed
  out = [dataclasses.replace(examples[i], target=texts[i]) for i in range(len(examples))
         if i in texts]
  return out, records


def run_async(coro):
  """Runs a coroutine to completion (no event loop may be running in this thread)."""
  return asyncio.run(coro)


# ---------------------------------------------------------------------------------------------------
# Encoded examples and batches.


@dataclasses.dataclass
class Encoded:
  """An example as token ids (before padding).

  Attributes:
    domains: domain index of each slot (``adapter.DOMAINS``).
    slots: entity index of each slot.
    prompt: prompt ids; slot: slot index per prompt id (-1 text).
    target: target ids (eos included when it fit).
  """

  task: str
  domains: tuple[int, ...]
  slots: tuple[int, ...]
  prompt: list[int]
  slot: list[int]
  target: list[int]


def encode_examples(examples: Sequence[Example], tokenizer: Tokenizer, *, n_tokens: int,
                    target_tokens: int, placeholder_id: int,
                    domains: Sequence[str]) -> list[Encoded]:
  """Prompt ids (with placeholders) and cleaned target ids of each example."""
  out = []
  for ex in examples:
    task = get_task(ex.task)
    ids, slot = elm_prompt_ids(tokenizer, task, n_tokens, placeholder_id=placeholder_id)
    target = clean_target(ex.target, tokenizer, target_tokens) if ex.target else []
    out.append(Encoded(ex.task, tuple(domains.index(d) for d in task.domains), tuple(ex.slots),
                       ids, slot, target))
  return out


def collate(rows: Sequence[Encoded], tables: Mapping[int, np.ndarray], *, prompt_len: int,
            target_len: int, pad_id: int, max_slots: int = 2) -> dict[str, np.ndarray]:
  """Pads encoded examples into one batch.

  Args:
    rows: B encoded examples.
    tables: domain index -> [N_dom, d] standardised embedding table.
    prompt_len: P, prompts are left-padded to it (must fit every prompt).
    target_len: L, targets are right-padded to it (must fit every target).
    pad_id: id at padded positions.
    max_slots: S, embedding slots per row (unused slots hold zeros).

  Returns:
    ``tokens`` [B, T] int32, ``attention_mask`` [B, T] bool, ``slot_index`` [B, T] int32,
    ``loss_mask`` [B, T] bool, ``z`` [B, S, d] float32, ``domain`` [B, S] int32, ``T = P + L``.
  """
  b, t = len(rows), prompt_len + target_len
  d = next(iter(tables.values())).shape[1]
  tokens = np.full((b, t), pad_id, np.int32)
  attn = np.zeros((b, t), bool)
  slot_index = np.full((b, t), -1, np.int32)
  loss = np.zeros((b, t), bool)
  z = np.zeros((b, max_slots, d), np.float32)
  domain = np.zeros((b, max_slots), np.int32)
  for r, ex in enumerate(rows):
    p, n = len(ex.prompt), len(ex.target)
    if p > prompt_len:
      raise ValueError(f"collate: prompt of {p} tokens ({ex.task}) exceeds prompt_len={prompt_len}")
    if n > target_len:
      raise ValueError(f"collate: target of {n} tokens exceeds target_len={target_len}")
    if len(ex.slots) > max_slots:
      raise ValueError(f"collate: {len(ex.slots)} slots exceed max_slots={max_slots}")
    tokens[r, prompt_len - p:prompt_len] = ex.prompt
    slot_index[r, prompt_len - p:prompt_len] = ex.slot
    attn[r, prompt_len - p:prompt_len + n] = True
    tokens[r, prompt_len:prompt_len + n] = ex.target
    loss[r, prompt_len:prompt_len + n] = True
    for s, (dom, idx) in enumerate(zip(ex.domains, ex.slots)):
      z[r, s] = tables[dom][idx]
      domain[r, s] = dom
  return {"tokens": tokens, "attention_mask": attn, "slot_index": slot_index, "loss_mask": loss,
          "z": z, "domain": domain}


def epoch_order(num: int, batch: int, step: int, seed: int) -> np.ndarray:
  """Row indices of training step ``step``: epochs are seeded permutations (resume-exact).

  Rows ``[step * batch, (step + 1) * batch)`` of the concatenation of the permutations
  ``rng(seed, epoch).permutation(num)`` for epochs 0, 1, ...: [batch] int.
  """
  if num <= 0:
    raise ValueError("epoch_order: no training examples")
  start = step * batch
  out = []
  while len(out) < batch:
    epoch, offset = divmod(start + len(out), num)
    perm = np.random.default_rng([seed, epoch]).permutation(num)
    out.extend(perm[offset:offset + batch - len(out)].tolist())
  return np.asarray(out, np.int64)


def split_indices(candidates: np.ndarray, n_train: int, n_test: int, seed: int
                  ) -> tuple[np.ndarray, np.ndarray]:
  """A seeded permutation of ``candidates`` cut into ``n_train`` and ``n_test`` indices."""
  if n_train + n_test > len(candidates):
    raise ValueError(f"split: {n_train} + {n_test} exceed the {len(candidates)} candidates")
  perm = np.random.default_rng(seed).permutation(candidates)
  return np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])


def pairs(indices: np.ndarray, n: int, seed: int) -> list[tuple[int, int]]:
  """``n`` distinct unordered pairs of distinct indices (seeded)."""
  rng = np.random.default_rng(seed)
  out: list[tuple[int, int]] = []
  seen = set()
  limit = len(indices) * (len(indices) - 1) // 2
  while len(out) < min(n, limit):
    a, b = rng.choice(indices, 2, replace=False)
    key = (int(min(a, b)), int(max(a, b)))
    if key not in seen:
      seen.add(key)
      out.append((int(a), int(b)))
  return out
