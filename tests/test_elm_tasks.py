"""ELM tasks: prompt placeholders, target cleaning, padded batches and loss masks, cached targets."""

import asyncio
import dataclasses
import functools

import numpy as np
import pytest

from eagle_jax import assets
from eagle_jax.elm import tasks
from eagle_jax.env import cache as cache_lib
from eagle_jax.env import client as client_lib
from eagle_jax.models.tokenizer import Tokenizer

PH = 0  # placeholder id used in these tests


@functools.cache
def tok():
  return Tokenizer.from_gguf(assets.smollm2_gguf())


def test_prompt_placeholders_are_exactly_the_marked_slots():
  t = tok()
  task = tasks.TASKS["comparison"]
  ids, slots = tasks.elm_prompt_ids(t, task, 3, placeholder_id=PH)
  assert len(ids) == len(slots)
  soft = [i for i, s in enumerate(slots) if s >= 0]
  assert [slots[i] for i in soft] == [0, 1, 2, 3, 4, 5]
  assert all(ids[i] == PH for i in soft)
  # Slot 0's three positions come before slot 1's, with text in between.
  assert soft[:3] == list(range(soft[0], soft[0] + 3)) and soft[3] > soft[2] + 1
  # The text around the placeholders is the chat-formatted prompt.
  text = t.decode([i for i, s in zip(ids, slots) if s < 0], skip_special_tokens=False)
  assert text.startswith("<|im_start|>system\n" + tasks.ELM_SYSTEM)
  assert "Compare the movies  and  in two sentences.<|im_end|>" in text
  assert text.endswith("<|im_start|>assistant\n")


def test_prompt_with_fill_is_plain_text_without_soft_positions():
  t = tok()
  ids, slots = tasks.elm_prompt_ids(t, tasks.TASKS["summary"], 1, placeholder_id=PH,
                                    fill=["Toy Story (1995)"])
  assert all(s == -1 for s in slots)
  expected = t.apply_chat_template([
      {"role": "system", "content": tasks.ELM_SYSTEM},
      {"role": "user", "content": "Summarize the movie Toy Story (1995) in two sentences."}],
      tokenize=True)
  assert ids == expected


def test_clean_target_cuts_whole_sentences_and_appends_eos():
  t = tok()
  text = "Sure! Here is a summary: A toy cowboy fears a new spaceman toy. They become friends " \
         "in the end. And then the"
  ids = tasks.clean_target(text, t, 48)
  assert ids[-1] == t.eos_id
  assert t.decode(ids[:-1]) == "A toy cowboy fears a new spaceman toy. They become friends in the end."
  # Too long for two sentences: keeps the first one only.
  n1 = len(t.encode("A toy cowboy fears a new spaceman toy."))
  short = tasks.clean_target(text, t, n1 + 1)
  assert t.decode(short[:-1]) == "A toy cowboy fears a new spaceman toy."
  with pytest.raises(Exception, match="shorter"):
    tasks.clean_target("Ok.", t, 48)


def _row(prompt, slot, target, slots=(3,), domains=(0,)):
  return tasks.Encoded("summary", domains, slots, list(prompt), list(slot), list(target))


def test_collate_layout_and_loss_mask_cover_only_targets():
  tables = {0: np.arange(20, dtype=np.float32).reshape(10, 2),
            1: -np.arange(8, dtype=np.float32).reshape(4, 2)}
  rows = [_row([11, 12, PH, 13], [-1, -1, 0, -1], [21, 22, 23]),
          _row([14, PH, PH, 15, 16, 17], [-1, 0, 1, -1, -1, -1], [24],
               slots=(7, 2), domains=(0, 1))]
  b = tasks.collate(rows, tables, prompt_len=6, target_len=4, pad_id=99)
  np.testing.assert_array_equal(b["tokens"], [[99, 99, 11, 12, PH, 13, 21, 22, 23, 99],
                                              [14, PH, PH, 15, 16, 17, 24, 99, 99, 99]])
  np.testing.assert_array_equal(b["loss_mask"], [[0, 0, 0, 0, 0, 0, 1, 1, 1, 0],
                                                 [0, 0, 0, 0, 0, 0, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["attention_mask"], [[0, 0, 1, 1, 1, 1, 1, 1, 1, 0],
                                                      [1, 1, 1, 1, 1, 1, 1, 0, 0, 0]])
  np.testing.assert_array_equal(b["slot_index"], [[-1, -1, -1, -1, 0, -1, -1, -1, -1, -1],
                                                  [-1, 0, 1, -1, -1, -1, -1, -1, -1, -1]])
  np.testing.assert_array_equal(b["z"], [[[6, 7], [0, 0]], [[14, 15], [-4, -5]]])
  np.testing.assert_array_equal(b["domain"], [[0, 0], [0, 1]])
  # Loss positions are exactly the target tokens: never a prompt, placeholder or pad position.
  assert not np.any(b["loss_mask"] & (b["slot_index"] >= 0))
  assert np.all(b["attention_mask"][b["loss_mask"]])
  with pytest.raises(ValueError, match="prompt_len"):
    tasks.collate(rows, tables, prompt_len=5, target_len=4, pad_id=99)


def test_epoch_order_is_a_permutation_per_epoch_and_resume_exact():
  steps = [tasks.epoch_order(10, 4, s, seed=3) for s in range(5)]
  flat = np.concatenate(steps)
  assert sorted(flat[:10].tolist()) == list(range(10))
  assert sorted(flat[10:20].tolist()) == list(range(10))
  np.testing.assert_array_equal(tasks.epoch_order(10, 4, 3, seed=3), steps[3])
  assert not np.array_equal(tasks.epoch_order(10, 4, 0, seed=4), steps[0])


class _Unused(client_lib.SamplingBackend):
  """A backend that must not be reached: every request is in the on-disk cache."""

  model_id = "m"
  default_chat = True

  async def generate(self, prompts, params, *, on_result=None):
    raise AssertionError(f"cache miss for {prompts}")


@dataclasses.dataclass
class _Ratings:
  titles: list
  genres: list


def test_generate_targets_uses_real_facts_cache_and_retries(tmp_path):
  t = tok()
  ratings = _Ratings(["Alien (1979)", "Babe (1995)"], [("Horror", "Sci-Fi"), ("Children's",)])
  examples = [tasks.Example("summary", (0,)), tasks.Example("comparison", (0, 1))]
  sampling = dict(max_tokens=40, temperature=0.7, top_p=0.9, repetition_penalty=1.2,
                  no_repeat_ngram=3)
  cache = cache_lib.ResponseCache(tmp_path / "r.jsonl")
  from eagle_jax.data import records as records_lib

  def put(ex, attempt, text):
    msgs = tasks.env_messages(tasks.TASKS[ex.task], ex, ratings, None)
    q = client_lib.SamplingParams(max_tokens=40, temperature=0.7, top_p=0.9,
                                  repetition_penalty=1.2, no_repeat_ngram=3, chat=True,
                                  seed=records_lib.derive_seed(5, "elm", ex.task, *ex.slots, attempt))
    cache.put(cache_lib.cache_key("m", msgs, q), client_lib.Completion(text=text),
              model="m", prompt=msgs, params=q)
    return msgs

  msgs = put(examples[0], 0, "A crew meets a deadly creature aboard their ship in deep space.")
  assert "Alien (1979)" in msgs[1]["content"] and "Horror, Sci-Fi" in msgs[1]["content"]
  put(examples[1], 0, "Eh.")  # unparsable: retried with the next seed
  put(examples[1], 1, "One is a space horror film while the other is a gentle farm fable.")
  client = cache_lib.CachedClient(_Unused(), cache, model_id="m")
  done, records = asyncio.run(tasks.generate_targets(
      client, examples, ratings, tokenizer=t, target_tokens=48, sampling=sampling, seed=5,
      retries=1))
  assert [e.target for e in done] == [
      "A crew meets a deadly creature aboard their ship in deep space.",
      "One is a space horror film while the other is a gentle farm fable."]
  assert [r["parsed"] for r in records] == [True, False, True]
  assert client.hits == 3 and client.misses == 0
