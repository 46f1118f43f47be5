"""Chapter 04: instruction tuning — loaders for real formats, the chat template, collation into
labels, and the SFT loop (response-only loss, padding invariance, gradient accumulation).

Each case of docs/bugs.md named in a docstring is a fault the code must make impossible:
B01 (label shift / single-token response), B02 (template tokenized in context), B03 (pad == eos),
B09 (one BOS; specials never split). Real samples: datasets/real/*/SOURCE.md.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minillm.data import (IGNORE_INDEX, CollateReport, PreferenceExample, SFTExample, collate, collate_preference,
                          format_chat, render_chat, render_preference, render_preference_pairs, render_prompt,
                          tokenize_sft, truncate)
from minillm.loaders import (detect_format, load_alpaca, load_chat, load_dataset, load_oasst, load_preference,
                             load_text)
from minillm.textfiles import DataError

REPO = Path(__file__).resolve().parents[1]
DATASETS = REPO / "datasets"
REAL = DATASETS / "real"


@pytest.fixture(scope="module")
def world():
    from minillm.tasks import TaskWorld

    return TaskWorld()


@pytest.fixture(scope="module")
def tok(world):
    from minillm.tasks import tokenizer_training_text
    from minillm.tokenizer import Tokenizer

    return Tokenizer.train(tokenizer_training_text(world), 1024)


def _targets(labels: np.ndarray) -> np.ndarray:
    """The shifted view the loss uses: targets[t] = labels[t+1] for logits rows t = 0..T-2."""
    return labels[..., 1:]


def _masked_ce(logits: np.ndarray, labels: np.ndarray) -> float:
    """Mean cross-entropy over non-ignored shifted targets (the reference loss, float64)."""
    lg = logits[:, :-1].astype(np.float64)
    tg = _targets(labels)
    lse = np.log(np.exp(lg - lg.max(-1, keepdims=True)).sum(-1)) + lg.max(-1)
    valid = tg != IGNORE_INDEX
    picked = np.take_along_axis(lg, np.where(valid, tg, 0)[..., None], -1)[..., 0]
    return float(((lse - picked) * valid).sum() / valid.sum())


# ---------------------------------------------------------------------------------------------- B01

def test_labels_are_unshifted_and_the_first_response_token_is_trained():
    """docs/bugs.md B01: prompt [5,6,7], response [8,9] + EOS 2."""
    batch = collate([([5, 6, 7, 8, 9, 2], [0, 0, 0, 1, 1, 1])], pad_id=0)
    assert batch["labels"].tolist() == [[-100, -100, -100, 8, 9, 2]]
    tg = _targets(batch["labels"])[0]
    assert tg.tolist() == [-100, -100, 8, 9, 2]
    assert np.flatnonzero(tg != IGNORE_INDEX).tolist() == [2, 3, 4]  # row 2 (token 7) predicts 8
    for k in ("input_ids", "attention_mask", "labels"):
        assert batch[k].dtype == np.int64 and batch[k].shape == (1, 6)


def test_an_eos_only_response_trains_one_token_with_a_finite_loss():
    """docs/bugs.md B01 edge case: response = [EOS] alone -> exactly 1 trained target, finite loss."""
    batch = collate([([5, 6, 7, 2], [0, 0, 0, 1])], pad_id=0)
    tg = _targets(batch["labels"])[0]
    assert tg.tolist() == [-100, -100, 2]
    assert int((tg != IGNORE_INDEX).sum()) == 1
    logits = np.random.default_rng(0).normal(size=(1, 4, 10)).astype(np.float32)
    assert np.isfinite(_masked_ce(logits, batch["labels"]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(1, 6), st.integers(0, 5)), min_size=1, max_size=5))
def test_trained_targets_equal_response_plus_eos_for_any_lengths(shapes):
    """docs/bugs.md B01 property: #non-ignored targets == len(response) + 1 (the EOS), per row."""
    eos = 2
    examples = []
    for n_prompt, n_resp in shapes:
        ids = [1] + [10 + i for i in range(n_prompt)] + [40 + i for i in range(n_resp)] + [eos]
        mask = [0] * (1 + n_prompt) + [1] * (n_resp + 1)
        examples.append((ids, mask))
    batch = collate(examples, pad_id=eos)
    per_row = (_targets(batch["labels"]) != IGNORE_INDEX).sum(1).tolist()
    assert per_row == [n_resp + 1 for _, n_resp in shapes]


def test_a_rendered_example_trains_the_response_and_eos(tok):
    msgs = [{"role": "user", "content": "What is the capital of France?"}, {"role": "assistant", "content": "Paris."}]
    ids, mask = render_chat(msgs, tok)
    batch = collate([(ids, mask)], pad_id=tok.pad_id)
    resp = tok.encode(" Paris.", allowed_special="none")
    n = int((_targets(batch["labels"]) != IGNORE_INDEX).sum())
    assert n == len(resp) + 1
    assert batch["labels"][0, -len(resp) - 1:].tolist() == resp + [tok.eos_id]


# ---------------------------------------------------------------------------------------------- B02

def test_the_mask_comes_from_the_renderer_at_the_prompt_boundary(tok):
    """docs/bugs.md B02 (right boundary, trl #1920): for ("hi", "yo") the first trained label is the
    first token of " yo" as encoded in context (with its leading space); [/INST] carries -100."""
    msgs = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    ids, mask = render_chat(msgs, tok)
    inst, inst_end = tok.special_tokens["[INST]"], tok.special_tokens["[/INST]"]
    prompt = render_prompt(msgs[:1], tok)
    assert prompt == [tok.bos_id, inst] + tok.encode(" hi ", allowed_special="none") + [inst_end]
    assert ids[:len(prompt)] == prompt and mask[:len(prompt)] == [0] * len(prompt)
    resp = tok.encode(" yo", allowed_special="none")
    assert ids[len(prompt):] == resp + [tok.eos_id] and mask[len(prompt):] == [1] * (len(resp) + 1)
    labels = collate([(ids, mask)], pad_id=tok.pad_id)["labels"][0].tolist()
    first = next(i for i, v in enumerate(labels) if v != IGNORE_INDEX)
    assert first == len(prompt) and labels[first] == resp[0]
    assert tok.decode([resp[0]]).startswith(" ")  # the leading space belongs to the response
    assert labels[first - 1] == IGNORE_INDEX and ids[first - 1] == inst_end
    # the text form tokenizes the same way in context (specials cut out before BPE)
    assert tok.encode(format_chat(msgs), allowed_special="all") == ids


def test_a_merge_across_the_template_boundary_does_not_shift_the_mask():
    """docs/bugs.md B02 on a toy BPE whose only merge is (10, 35) -> 256 ("\n#"): text "hi\n#A:yo"
    encodes as [104, 105, 256, 65, 58, 121, 111], and "#A:" alone as [35, 65, 58] (not a
    subsequence). minillm never searches for a template: [/INST] is a special id and the mask
    comes from the renderer, so the response labels are exact whatever the merges."""
    from minillm.tokenizer import Tokenizer

    toy = Tokenizer(merges=[((10, 35), 256)], pattern=None)
    assert toy.encode("hi\n#A:yo") == [104, 105, 256, 65, 58, 121, 111]
    assert toy.encode("#A:") == [35, 65, 58]
    sp = toy.special_tokens
    msgs = [{"role": "user", "content": "hi\n#A:"}, {"role": "assistant", "content": "yo"}]
    ids, mask = render_chat(msgs, toy)
    assert ids == [sp["<|bos|>"], sp["[INST]"], 32, 104, 105, 256, 65, 58, 32, sp["[/INST]"], 32, 121, 111, sp["<|eos|>"]]
    labels = collate([(ids, mask)], pad_id=sp["<|pad|>"])["labels"][0].tolist()
    assert labels == [-100] * 10 + [32, 121, 111, sp["<|eos|>"]]
    assert toy.encode(format_chat(msgs), allowed_special="all") == ids


def test_every_kept_example_has_a_trained_target():
    """docs/bugs.md B02 property: no silent all-IGNORE row; such examples are skipped and counted."""
    rep = CollateReport()
    batch = collate([([1, 5, 6], [0, 0, 0]), ([1, 5, 7, 2], [0, 0, 1, 1])], pad_id=0, report=rep)
    assert batch["labels"].shape == (1, 4)
    assert (batch["labels"] != IGNORE_INDEX).sum(1).min() >= 1
    assert rep.skipped == {"no_target": 1} and rep.n_kept == 1 and rep.n_examples == 2


# ---------------------------------------------------------------------------------------------- B03

def test_pad_equal_to_eos_keeps_the_eos_label():
    """docs/bugs.md B03: pad_id == eos_id == 2; padding is found by the attention mask, not by id."""
    batch = collate([([5, 6, 7, 8, 2], [0, 0, 1, 1, 1]), ([5, 9, 2], [0, 1, 1])], pad_id=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 2], [5, 9, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert batch["labels"].tolist() == [[-100, -100, 7, 8, 2], [-100, 9, 2, -100, -100]]
    assert int((_targets(batch["labels"]) == 2).sum()) == 2  # both real EOS targets survive


def test_full_sequence_labels_with_pad_equal_to_eos():
    """docs/bugs.md C14: ids [5,6,2,2], attention [1,1,1,0], pad = eos = 2 -> labels [5,6,2,-100]."""
    batch = collate([([5, 6, 2], [1, 1, 1]), ([5, 6, 2, 7], [1, 1, 1, 1])], pad_id=2)
    assert batch["input_ids"][0].tolist() == [5, 6, 2, 2]
    assert batch["labels"][0].tolist() == [5, 6, 2, -100]


# ---------------------------------------------------------------------------------------------- B09 and the template

def test_one_bos_and_text_roundtrip_for_every_builtin_record(tok, world):
    """docs/bugs.md B09: rendering as text then encoding gives exactly one <|bos|> at index 0, one
    <|eos|> at the end, and the same ids as rendering from the messages -- for every SFT, test,
    paraphrase and preference record of the task world."""
    rows = (world.sft_records("noisy") + world.sft_test_records() + world.sft_paraphrase_records())
    for r in rows:
        msgs = [{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["output"]}]
        ids, mask = render_chat(msgs, tok)
        text = format_chat(msgs)
        assert text == f"<|bos|>[INST] {r['instruction']} [/INST] {r['output']}<|eos|>"
        assert tok.encode(text, allowed_special="all") == ids
        assert ids.count(tok.bos_id) == 1 and ids[0] == tok.bos_id
        assert ids.count(tok.eos_id) == 1 and ids[-1] == tok.eos_id
        assert tok.decode([i for i, m in zip(ids, mask) if m]) == f" {r['output']}<|eos|>"
    for r in world.preference_records("test"):
        (ci, cm), (ri, rm) = render_preference(r, tok)
        assert ci.count(tok.bos_id) == 1 and ri.count(tok.bos_id) == 1
        assert (ri[-1] == tok.eos_id) == r["rejected_eos"]
        assert tok.decode([i for i, m in zip(ri, rm) if m]) == " " + r["rejected"] + ("<|eos|>" if r["rejected_eos"] else "")


_TEXT = st.lists(st.sampled_from(list("abcXYZ 019.,?!-'\n\té’ü") + ["Sure!", " the", "[INST", "|>"]),
                 max_size=12).map("".join)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(_TEXT, _TEXT), min_size=1, max_size=3))
def test_rendering_equals_encoding_the_text_for_any_turns(tok, turns):
    """For any conversation without special strings: encode(format_chat(m)) == render_chat(m) ids,
    and the mask trains exactly sum(len(encode(" " + reply)) + 1) tokens."""
    msgs = [m for u, a in turns for m in ({"role": "user", "content": u}, {"role": "assistant", "content": a})]
    ids, mask = render_chat(msgs, tok)
    assert tok.encode(format_chat(msgs), allowed_special="all") == ids
    assert sum(mask) == sum(len(tok.encode(" " + a, allowed_special="none")) + 1 for _, a in turns)
    assert ids.count(tok.bos_id) == 1 and ids.count(tok.eos_id) == len(turns)


def test_special_strings_in_user_text_stay_plain_bytes(tok):
    """A literal "[INST]" typed by a user is not the special token (B09, allowed_special="none")."""
    ids, _ = render_chat([{"role": "user", "content": "say [INST] now"}, {"role": "assistant", "content": "ok"}], tok)
    assert ids.count(tok.special_tokens["[INST]"]) == 1


def test_multi_turn_masks_every_assistant_turn(tok):
    msgs = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "What is 2 plus 3?"}, {"role": "assistant", "content": "5."}]
    ids, mask = render_chat(msgs, tok)
    assert format_chat(msgs) == "<|bos|>[INST] Hi. [/INST] Hello.<|eos|>[INST] What is 2 plus 3? [/INST] 5.<|eos|>"
    assert tok.encode(format_chat(msgs), allowed_special="all") == ids
    runs, cur = [], []
    for i, m in zip(ids, mask):
        if m:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    runs.append(cur)
    assert [tok.decode(r) for r in runs] == [" Hello.<|eos|>", " 5.<|eos|>"]
    ids_last, mask_last = render_chat(msgs, tok, train_on="last")
    assert ids_last == ids and tok.decode([i for i, m in zip(ids, mask_last) if m]) == " 5.<|eos|>"
    # prompt + reply == the rendered conversation
    assert render_prompt(msgs[:3], tok) + tok.encode(" 5.", allowed_special="none") + [tok.eos_id] == ids


def test_system_turn_is_prepended_to_the_first_user_message(tok):
    sys_msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi."},
                {"role": "assistant", "content": "Hello."}]
    folded = [{"role": "user", "content": "Be brief.\n\nHi."}, {"role": "assistant", "content": "Hello."}]
    assert render_chat(sys_msgs, tok) == render_chat(folded, tok)
    assert format_chat(sys_msgs, system_format="llama2").startswith("<|bos|>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi.")


def test_template_errors(tok):
    with pytest.raises(ValueError, match="expected 'assistant'"):
        render_chat([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], tok)
    with pytest.raises(ValueError, match="ending with an assistant turn"):
        render_chat([{"role": "user", "content": "a"}], tok)
    with pytest.raises(ValueError, match="ending with a user turn"):
        render_prompt([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}], tok)
    with pytest.raises(ValueError, match="eos=False"):
        render_chat([{"role": "user", "content": "a"}, {"role": "assistant", "content": "b", "eos": False},
                     {"role": "user", "content": "c"}, {"role": "assistant", "content": "d"}], tok)


# ---------------------------------------------------------------------------------------------- truncation, padding

def test_truncation_cuts_prompt_from_the_left_and_keeps_bos():
    ids = [100, 1, 2, 3, 4, 50, 51, 2]
    mask = [0, 0, 0, 0, 0, 1, 1, 1]
    assert truncate(ids, mask, 8) == (ids, mask, 0)
    assert truncate(ids, mask, 6) == ([100, 3, 4, 50, 51, 2], [0, 0, 0, 1, 1, 1], 2)
    assert truncate(ids, mask, 4) == ([100, 50, 51, 2], [0, 1, 1, 1], 4)
    assert truncate(ids, mask, 3) == "response_too_long"
    assert truncate(ids, mask, 3, keep_first=0) == "response_too_long"  # label position 0 is never trained
    assert truncate(ids, mask, 4, keep_first=0) == ([4, 50, 51, 2], [0, 1, 1, 1], 4)
    rep = CollateReport()
    batch = collate([(ids, mask), (ids[:2] + ids[5:], mask[:2] + mask[5:]), ([7, 8, 9, 10, 11], [0, 1, 1, 1, 1])],
                    pad_id=0, max_length=4, report=rep)
    assert batch["input_ids"].tolist() == [[100, 50, 51, 2], [100, 50, 51, 2]]
    assert batch["labels"].tolist() == [[-100, 50, 51, 2], [-100, 50, 51, 2]]
    assert (rep.n_examples, rep.n_kept, rep.n_truncated, rep.n_tokens_cut) == (3, 2, 2, 5)
    assert rep.skipped == {"response_too_long": 1}


def test_left_padding_and_pad_to():
    batch = collate([([1, 2, 3], [0, 1, 1]), ([1, 4], [0, 1])], pad_id=9, padding_side="left", pad_to=4)
    assert batch["input_ids"].tolist() == [[9, 1, 2, 3], [9, 9, 1, 4]]
    assert batch["attention_mask"].tolist() == [[0, 1, 1, 1], [0, 0, 1, 1]]
    assert batch["labels"].tolist() == [[-100, -100, 2, 3], [-100, -100, -100, 4]]
    with pytest.raises(ValueError, match="pad_to=2"):
        collate([([1, 2, 3], [0, 1, 1])], pad_id=0, pad_to=2)
    with pytest.raises(ValueError, match="length 3 but loss_mask has length 2"):
        collate([([1, 2, 3], [0, 1])], pad_id=0)
    empty = collate([([1, 2], [0, 0])], pad_id=0)
    assert empty["input_ids"].shape == (0, 0)


def test_tokenize_sft_and_collate_builtin_batch(tok, world):
    ds = load_dataset(DATASETS / "sft_train.jsonl")
    rep = CollateReport()
    rows = tokenize_sft(ds.records[:64], tok, max_length=64, report=rep)
    batch = collate(rows, pad_id=tok.pad_id)
    B, T = batch["input_ids"].shape
    assert B == 64 and T <= 64 and rep.n_kept == 64 and rep.n_skipped == 0
    n_targets = (_targets(batch["labels"]) != IGNORE_INDEX).sum(1)
    expect = [len(tok.encode(" " + ex.messages[1]["content"], allowed_special="none")) + 1 for ex in ds.records[:64]]
    assert n_targets.tolist() == expect
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_collate_preference_pads_pairs_with_the_shared_prompt_and_response_labels(tok, world):
    recs = world.preference_records("test")[:16]
    rep = CollateReport()
    b = collate_preference(render_preference_pairs(recs, tok, report=rep), tok.pad_id)
    assert set(b) == {"chosen", "rejected", "margin"} and b["margin"] is None and rep.n_kept == 16
    assert set(b["chosen"]) == set(b["rejected"]) == {"input_ids", "attention_mask", "labels"}
    assert b["chosen"]["labels"].dtype == np.int64 and b["chosen"]["input_ids"].shape[0] == 16
    for i, r in enumerate(recs):
        p = render_prompt([{"role": "user", "content": r["prompt"]}], tok)
        assert b["chosen"]["input_ids"][i, :len(p)].tolist() == p == b["rejected"]["input_ids"][i, :len(p)].tolist()
        n_c = int((b["chosen"]["labels"][i] != IGNORE_INDEX).sum())
        n_r = int((b["rejected"]["labels"][i] != IGNORE_INDEX).sum())
        assert n_c == len(tok.encode(" " + r["chosen"], allowed_special="none")) + 1
        assert n_r == len(tok.encode(" " + r["rejected"], allowed_special="none")) + int(r["rejected_eos"])
    # truncation cuts the shared prompt by the same amount for both halves
    ex = PreferenceExample([{"role": "user", "content": "word " * 30}], "A.", "B, with more words here.")
    (ci, cm), (ri, rm) = render_preference(ex, tok, max_length=16)
    assert len(ri) == 16 and ci[:cm.index(1)] == ri[:rm.index(1)] and ci[0] == tok.bos_id
    assert render_preference(ex, tok, max_length=3) == "response_too_long"
    rep = CollateReport()
    render_preference_pairs([ex, ex], tok, max_length=16, report=rep)
    full = render_chat(list(ex.prompt) + [{"role": "assistant", "content": ex.rejected}], tok)[0]
    assert (rep.n_kept, rep.n_truncated, rep.n_tokens_cut) == (2, 2, 2 * (len(full) - 16))


# ---------------------------------------------------------------------------------------------- loaders: built-in files

def test_load_builtin_datasets(world):
    sft = load_dataset(DATASETS / "sft_train.jsonl")
    assert sft.kind == "sft" and len(sft) == 1125 and sft.report.n_skipped == 0
    ex = sft[0]
    assert ex.messages == [{"role": "user", "content": "What is the capital of France?"},
                           {"role": "assistant", "content": "Paris."}]
    assert ex.meta == {"task": "capital", "fact_key": "capital:France", "answer": "Paris",
                       "template_id": "capital/q0", "fact_split": "train", "style": "plain"}
    pref = load_dataset(DATASETS / "pref_train.jsonl")
    assert pref.kind == "preference" and len(pref) == 2400
    recs = world.preference_records("train")
    assert sum(not p.rejected_eos for p in pref) == sum(r["kind"] == "no_eos" for r in recs) > 0
    assert pref[0].prompt == [{"role": "user", "content": recs[0]["prompt"]}] and pref[0].meta["kind"] == recs[0]["kind"]
    text = load_dataset(DATASETS / "corpus.txt")
    assert text.kind == "text" and text.text.startswith("<|bos|>")


# ---------------------------------------------------------------------------------------------- loaders: real samples

def test_alpaca_quirks_empty_and_nooutput_records_are_skipped_and_counted(tmp_path):
    """Alpaca-format quirks (as in Stanford Alpaca's data): an empty output and a ``<nooutput>`` output
    are skipped and counted; an input is appended to the instruction after a blank line."""
    recs = [{"instruction": "Give a tip.", "input": "", "output": "Sleep."},
            {"instruction": "Name one.", "input": "", "output": ""},
            {"instruction": "Odd one out?", "input": "Twitter, Instagram, Telegram", "output": "Telegram"},
            {"instruction": "Draw it.", "input": "", "output": "<nooutput> This needs an image."}]
    p = tmp_path / "alpaca.json"
    p.write_text(json.dumps(recs))
    ds = load_dataset(p)
    r = ds.report
    assert (r.n_records, r.n_examples) == (4, 2) and r.format == "alpaca-json"
    assert r.skipped == {"empty_output": 1, "nooutput": 1}
    assert ds[1].messages[0]["content"] == "Odd one out?\n\nTwitter, Instagram, Telegram"
    assert ds[1].messages[1]["content"] == "Telegram"


def test_self_instruct_seed_tasks_are_flattened(tmp_path):
    """Self-Instruct seed tasks (``instances``: a list of input/output) give one example per instance."""
    recs = [{"id": "seed_task_0", "name": "breakfast", "instruction": "Suggest a breakfast.",
             "instances": [{"input": "", "output": "Oats."}], "is_classification": False},
            {"id": "seed_task_1", "name": "sentiment", "instruction": "Label the sentiment.",
             "instances": [{"input": "I love it.", "output": "positive"}], "is_classification": True}]
    p = tmp_path / "seed_tasks.jsonl"
    p.write_text("".join(json.dumps(r) + "\n" for r in recs))
    ds = load_dataset(p)
    assert len(ds) == 2 and ds.report.notes == {"instances_flattened": 2, "with_input": 1}
    assert ds[0].meta == {"id": "seed_task_0", "name": "breakfast", "is_classification": False}
    assert ds[1].messages[0]["content"] == "Label the sentiment.\n\nI love it."


def test_real_sharegpt_conversations():
    ds = load_dataset(REAL / "fastchat-dummy-conversation" / "dummy_conversation.json")
    assert len(ds) == 150 and ds.report.n_skipped == 0
    assert ds[0].messages == [
        {"role": "user", "content": "Who are you?"},
        {"role": "assistant", "content": "I am Vicuna, a language model trained by researchers from Large Model "
                                         "Systems Organization (LMSYS)."},
        {"role": "user", "content": "Have a nice day!"}, {"role": "assistant", "content": "You too!"}]
    assert ds[0].meta == {"id": "identity_0"}
    assert sorted({len(e.messages) for e in ds}) == [2, 4, 6]


def test_real_oasst_trees():
    path = REAL / "oasst-en-100-trees" / "en_100_tree.first25.jsonl"
    sft = load_oasst(path)
    assert len(sft) == 88 and sft.report.skipped == {"prompter_leaf": 51}  # 139 root-to-leaf paths - 51
    assert all(e.messages[-1]["role"] == "assistant" for e in sft)
    assert sft[0].messages[0] == {"role": "user", "content": "How can I find the best 401k plan for my needs?"}
    assert sft[0].meta["message_tree_id"] == "054e1df3-35e0-4bb8-a585-607dbdcd24e0"
    pref = load_dataset(path, kind="preference")
    assert len(pref) == 171  # ranked assistant siblings in the first 25 trees
    assert pref[0].meta["chosen_rank"] < pref[0].meta["rejected_rank"]
    assert pref[0].prompt == [{"role": "user", "content": "How can I find the best 401k plan for my needs?"}]


def test_real_hh_rlhf_transcripts():
    ds = load_dataset(REAL / "hh-rlhf-harmless-base" / "harmless-base-test.sample.jsonl")
    r = ds.report
    assert (r.n_records, len(ds)) == (304, 301)
    assert r.skipped == {"empty_response": 3}  # SOURCE.md: lines 87, 301, 304
    assert r.notes == {"consecutive_turns_merged": 2}  # lines 302 and 303 have two Assistant turns in a row
    first = ds[0]
    assert [m["role"] for m in first.prompt] == ["user", "assistant", "user", "assistant", "user"]
    assert first.prompt[0]["content"] == "what are some pranks with a pen i can do?"
    assert first.chosen.startswith("No, sorry!") and not first.chosen.startswith(" ")
    assert all(p.prompt[-1]["role"] == "user" and p.chosen.strip() for p in ds)


def test_real_llamafactory_pairs():
    ds = load_preference(REAL / "llamafactory-dpo-en-demo" / "dpo_en_demo.json")
    assert len(ds) == 60 and ds.report.notes == {"system_turn": 20}
    assert ds[0].prompt[0]["content"].startswith("Hi! I'd like to create a new language game")
    assert ds[0].chosen.startswith("That sounds like a fun and engaging idea!")
    assert ds[1].prompt[0]["role"] == "system" and ds[1].prompt[0]["content"].startswith("You are a teacher.")


def test_real_rasbt_sft_and_preference():
    sft = load_alpaca(REAL / "rasbt-instruction-data" / "instruction-data.json")
    assert len(sft) == 1100 and sft.report.notes == {"with_input": 325}
    assert sft[0].messages[0]["content"] == ("Evaluate the following phrase by transforming it into the spelling "
                                             "given.\n\nfreind --> friend")
    pref = load_dataset(REAL / "rasbt-instruction-preference" / "instruction-data-with-preference.json")
    assert len(pref) == 1094 and pref.report.skipped == {"chosen_equals_rejected": 6}
    assert pref[0].rejected == ('The spelling of the given phrase "freind" is flat out wrong, get it together, '
                                'the correct spelling is "friend".')
    assert pref[0].meta["output"] == pref[0].chosen
    as_sft = load_dataset(REAL / "rasbt-instruction-preference" / "instruction-data-with-preference.json", kind="sft")
    assert len(as_sft) == 1100 and as_sft[0].messages[1]["content"] == sft[0].messages[1]["content"]


def test_real_tinyshakespeare():
    ds = load_text(REAL / "tinyshakespeare" / "input.txt")
    assert len(ds.text) == 127_176 and ds.text.startswith("First Citizen:\nBefore we proceed")
    assert ds.report.notes["lines"] == 5000


def test_every_real_sample_loads_and_renders(tok):
    files = sorted(p for p in REAL.glob("*/*") if p.name != "SOURCE.md")
    assert len(files) == 7
    for p in files:
        ds = load_dataset(p)
        assert len(ds) > 0 and ds.report.n_examples == len(ds)
        if ds.kind == "sft":
            rows = tokenize_sft(ds.records[:20], tok, max_length=256)
            assert rows and all(1 in m for _, m in rows)
        elif ds.kind == "preference":
            rep = CollateReport()
            b = collate_preference(render_preference_pairs(ds.records[:8], tok, 512, report=rep), tok.pad_id)
            assert rep.n_kept == len(b["chosen"]["labels"]) >= 1 and rep.n_kept + rep.n_skipped == 8
            assert (b["chosen"]["labels"] != IGNORE_INDEX).sum(1).min() >= 1
            assert (b["rejected"]["labels"] != IGNORE_INDEX).sum(1).min() >= 1


# ---------------------------------------------------------------------------------------------- bad input

def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data if isinstance(data, bytes) else data.encode())
    return p


def test_malformed_json_line_names_file_and_line(tmp_path):
    good = json.dumps({"instruction": "a", "input": "", "output": "b"})
    p = _write(tmp_path, "bad.jsonl", f"{good}\n{good}\n{{\"instruction\": \"x\",\n")
    with pytest.raises(DataError, match=r"bad\.jsonl:3: not valid JSON"):
        load_dataset(p)


def test_malformed_json_array_names_line_and_record(tmp_path):
    p = _write(tmp_path, "bad.json", '[\n  {"instruction": "a", "output": "b"},\n  {"instruction": "c" "output": 1}\n]')
    with pytest.raises(DataError, match=r"bad\.json:3: not valid JSON .* record \[1\]"):
        load_alpaca(p)


def test_missing_and_mistyped_fields(tmp_path):
    p = _write(tmp_path, "m.jsonl", '{"instruction": "a", "output": "b"}\n\n{"instruction": "c", "input": ""}\n')
    with pytest.raises(DataError, match=r"m\.jsonl:3: missing field 'output'"):
        load_alpaca(p)
    p = _write(tmp_path, "t.json", '[\n{"instruction": "a", "output": "b"},\n{"instruction": "c",\n "output": 7}]')
    with pytest.raises(DataError, match=r"t\.json:3 \(record \[1\]\): field 'output' must be str, got int"):
        load_alpaca(p)
    p = _write(tmp_path, "r.jsonl", '{"messages": [{"role": "robot", "content": "x"}]}\n')
    with pytest.raises(DataError, match=r"r\.jsonl:1 messages\[0\]: unknown role 'robot'"):
        load_chat(p)
    p = _write(tmp_path, "p.jsonl", '{"prompt": "q", "chosen": "a"}\n')
    with pytest.raises(DataError, match=r"p\.jsonl:1: missing field 'rejected'"):
        load_preference(p)
    p = _write(tmp_path, "u.jsonl", '{"foo": 1}\n')
    with pytest.raises(DataError, match=r"cannot tell the format from the keys \['foo'\]"):
        load_dataset(p)


def test_empty_dataset_errors(tmp_path):
    for name, data in (("e.jsonl", ""), ("ws.jsonl", "\n  \n"), ("e.json", "[]"), ("e.txt", "  \n")):
        with pytest.raises(DataError, match="empty dataset"):
            load_dataset(_write(tmp_path, name, data), format="alpaca" if name.endswith("json") else None)
    p = _write(tmp_path, "all_skipped.jsonl", '{"instruction": "a", "input": "", "output": ""}\n')
    with pytest.raises(DataError, match="empty dataset .*empty_output"):
        load_dataset(p)


def test_non_utf8_bytes_name_offset_and_line(tmp_path):
    p = _write(tmp_path, "bin.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "caf\xe9", "output": "b"}\n')
    with pytest.raises(DataError, match=r"bin\.jsonl:2: not valid UTF-8 at byte offset 56 \(line 2, byte column 21"):
        load_dataset(p)
    p = _write(tmp_path, "bin.txt", b"hello\nwor\xffld\n")
    with pytest.raises(DataError, match=r"bin\.txt:2: not valid UTF-8 at byte offset 9"):
        load_text(p)


def test_detect_format_and_kind_mismatch(tmp_path):
    assert detect_format(DATASETS / "pref_test.jsonl") == "preference"
    assert detect_format(DATASETS / "sft_test.jsonl") == "alpaca"
    assert detect_format(DATASETS / "corpus.txt") == "text"
    with pytest.raises(DataError, match="holds sft data"):
        load_dataset(DATASETS / "sft_test.jsonl", kind="preference")
    p = _write(tmp_path, "o.jsonl", json.dumps({"messages": [{"role": "system", "content": "s"},
                                                             {"role": "user", "content": "u"},
                                                             {"role": "assistant", "content": "a"},
                                                             {"role": "user", "content": "trailing"}]}) + "\n")
    ds = load_dataset(p)
    assert ds.report.notes == {"system_turn": 1, "trailing_user_turn_dropped": 1}
    assert [m["role"] for m in ds[0].messages] == ["system", "user", "assistant"]
    assert isinstance(ds[0], SFTExample)


# ---------------------------------------------------------------------------------------------- SFT


def _tiny_sft_setup(tok, n=12, seed=0):
    from minillm.model import GPT, GPTConfig
    from minillm.tasks import TaskWorld
    from minillm.train.sft import records_to_messages

    recs = TaskWorld().sft_records("noisy")[:n]
    ex = tokenize_sft(records_to_messages(recs), tok, max_length=64)
    model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32), seed=seed)
    return model, ex


def test_sft_loss_is_independent_of_padding(tok):
    """Extra right padding changes nothing: padding is masked out of attention and labels."""
    model, ex = _tiny_sft_setup(tok)
    tight = collate(ex, tok.pad_id)
    loose = collate(ex, tok.pad_id, pad_to=tight["input_ids"].shape[1] + 9)
    _, l1 = model(tight["input_ids"], attention_mask=tight["attention_mask"], labels=tight["labels"])
    _, l2 = model(loose["input_ids"], attention_mask=loose["attention_mask"], labels=loose["labels"])
    assert l1.item() == pytest.approx(l2.item(), rel=1e-6)
    # and pad == eos gives the same loss (padding is told by the mask, never by id; B03)
    same = collate(ex, tok.eos_id, pad_to=tight["input_ids"].shape[1] + 9)
    _, l3 = model(same["input_ids"], attention_mask=same["attention_mask"], labels=same["labels"])
    assert l3.item() == pytest.approx(l1.item(), rel=1e-6)


def test_gradient_accumulation_equals_the_big_batch_on_sft_data(tok):
    """docs/bugs.md B05 on real SFT batches of different lengths: accumulated gradients equal one batch's."""
    from minillm import functional as F
    from minillm.model import shift_labels
    from minillm.train.loop import accumulate_gradients

    model, ex = _tiny_sft_setup(tok)
    big = collate(ex, tok.pad_id)
    _, loss = model(big["input_ids"], attention_mask=big["attention_mask"], labels=big["labels"])
    model.zero_grad()
    loss.backward()
    ref = {n: p.grad.copy() for n, p in model.named_parameters()}
    model.zero_grad()
    micro = [collate(ex[:3], tok.pad_id), collate(ex[3:4], tok.pad_id), collate(ex[4:], tok.pad_id)]

    def loss_sum(b):
        logits, _ = model(b["input_ids"], attention_mask=b["attention_mask"])
        return F.cross_entropy(logits, shift_labels(b["labels"]), reduction="sum")

    mean, n_tok = accumulate_gradients(micro, loss_sum, lambda b: int((shift_labels(b["labels"]) != -100).sum()))
    assert n_tok == int((shift_labels(big["labels"]) != -100).sum())
    assert mean == pytest.approx(loss.item(), rel=1e-5)
    for n, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, ref[n], rtol=1e-4, atol=1e-7, err_msg=n)


def test_response_only_loss_trains_fewer_tokens_than_all_token_loss(tok):
    from minillm.model import IGNORE_INDEX as IGN

    _, ex = _tiny_sft_setup(tok)
    b = collate(ex, tok.pad_id)
    response_targets = int((b["labels"][:, 1:] != IGN).sum())
    all_targets = int(b["attention_mask"][:, 1:].sum())
    assert 0 < response_targets < all_targets / 2  # instructions and template carry no loss


def test_sft_end_to_end_on_a_tiny_base(tmp_path, tok):
    """`sft()` loads a base checkpoint, trains, writes metrics.json and a loadable checkpoint."""
    from minillm.checkpoint import load_model, save_checkpoint
    from minillm.model import GPT, GPTConfig
    from minillm.train.sft import SFTConfig, sft

    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
    save_checkpoint(tmp_path / "base.safetensors", base, tok)
    runs = {}
    for loss_on in ("response", "all"):
        cfg = SFTConfig(base=str(tmp_path / "base.safetensors"), out_dir=str(tmp_path / loss_on), max_steps=8,
                        batch_size=8, lr=3e-3, eval=False, progress=False, loss_on=loss_on)
        runs[loss_on] = sft(cfg)
        assert np.isfinite(runs[loss_on].losses).all() and len(runs[loss_on].losses) == 8
        assert runs[loss_on].losses[-1] < runs[loss_on].losses[0]
        m = json.loads((tmp_path / loss_on / "metrics.json").read_text())
        assert m["data"]["n_kept"] == 1125 and m["parameters"]["percent"] == 100.0
        model, tok2, _ = load_model(runs[loss_on].checkpoint)
        assert tok2.vocab_size == tok.vocab_size
    assert runs["response"].losses[0] != runs["all"].losses[0]  # different targets, different loss
    with pytest.raises(ValueError, match="loss_on"):
        SFTConfig(loss_on="prompt")


def test_sft_lora_trains_only_adapters_and_saves_merged_weights(tmp_path, tok):
    from minillm.checkpoint import load_model, save_checkpoint
    from minillm.model import GPT, GPTConfig
    from minillm.train.sft import SFTConfig, sft

    base = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
    save_checkpoint(tmp_path / "base.safetensors", base, tok)
    for flag in ("lora", "qlora"):
        cfg = SFTConfig(base=str(tmp_path / "base.safetensors"), out_dir=str(tmp_path / flag), max_steps=6,
                        batch_size=8, lr=5e-3, eval=False, progress=False, **{flag: True})
        res = sft(cfg)
        p = res.metrics["parameters"]
        assert 0 < p["trainable"] < p["total"] and p["percent"] < 20
        merged, _, _ = load_model(res.checkpoint)  # a plain GPT again, same keys as the base
        assert set(merged.state_dict()) == set(base.state_dict())
        changed = [n for n, a in merged.state_dict().items() if not np.array_equal(a, base.state_dict()[n])]
        if flag == "lora":  # only the adapted q/v projections moved
            assert changed and all(n.endswith(("q_proj.weight", "v_proj.weight")) for n in changed)
            # the adapter alone is saved beside the checkpoint; base + adapter = the merged model
            from minillm.lora import load_adapter, merge_and_unload

            assert res.metrics["adapter"] == str(tmp_path / flag / "adapter.safetensors")
            rebuilt, _, _ = load_model(tmp_path / "base.safetensors")
            load_adapter(rebuilt, res.metrics["adapter"])
            rebuilt = merge_and_unload(rebuilt)
            for n, a in merged.state_dict().items():
                np.testing.assert_allclose(rebuilt.state_dict()[n], a, rtol=1e-6, atol=1e-7, err_msg=n)
        else:
            assert (tmp_path / flag / "adapter.safetensors").exists()
        if flag == "qlora":  # the 4-bit base was dequantized: every block Linear weight differs by quantization error
            assert any("mlp.c_fc.weight" in n for n in changed)


def test_sft_gradient_accumulation_equals_one_big_batch(tok):
    """The shared loop with gradient accumulation (2 micro-batches of 4) gives the gradient and loss of one
    batch of the same 8 examples (the per-token mean over both, docs/bugs.md B05); through SFT, one AdamW
    step then moves the weights alike (to AdamW's first-step sensitivity to float noise in tiny gradients)."""
    from minillm.model import GPT, GPTConfig, shift_labels
    from minillm.optim import Optimizer
    from minillm.tasks import TaskWorld
    from minillm.train.loop import train_loop
    from minillm.train.sft import SFTConfig, records_to_messages, train_sft

    ex = tokenize_sft(records_to_messages(TaskWorld().sft_records("noisy")[:40]), tok, max_length=64)

    class Recorder(Optimizer):  # keeps the gradients of each step instead of stepping
        def step(self):
            self.grads = [p.grad.copy() for _, _, p in self._indexed()]

    def run(micro):
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
        params = model.parameters()
        opt = Recorder(params, {"lr": 0.0})

        def loss_fn(b):
            return model(b["input_ids"], attention_mask=b["attention_mask"], labels=b["labels"])[1], {}

        weight_fn = (lambda b: int((shift_labels(b["labels"]) != -100).sum())) if len(micro) > 1 else None
        batch = micro if len(micro) > 1 else micro[0]
        hist = train_loop(opt, params, iter([batch]), loss_fn, max_steps=1, lr=1.0, grad_clip=0.0,
                          weight_fn=weight_fn, progress=False)
        return hist[0]["loss"], opt.grads

    big_loss, big = run([collate(ex[:8], tok.pad_id)])
    acc_loss, acc = run([collate(ex[:4], tok.pad_id), collate(ex[4:8], tok.pad_id)])
    assert acc_loss == pytest.approx(big_loss, rel=1e-5)
    for g_acc, g_big in zip(acc, big):
        assert g_acc.dtype == np.float32
        np.testing.assert_allclose(g_acc, g_big, rtol=1e-4, atol=1e-7)
    after = {}
    for acc_steps, bs in ((1, 8), (2, 4)):  # the same 8 examples: index_batches draws 4 + 4 from one permutation
        model = GPT(GPTConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=1, n_head=2, n_embd=32), seed=0)
        cfg = SFTConfig(batch_size=bs, gradient_accumulation_steps=acc_steps, max_steps=1, lr=1e-2, warmup_steps=0,
                        progress=False)
        after[acc_steps] = (train_sft(model, tok, ex, cfg)[0], {n: p.data.copy() for n, p in model.named_parameters()})
    assert after[1][0] == pytest.approx(after[2][0], rel=1e-5)
    for n, w in after[1][1].items():
        np.testing.assert_allclose(after[2][1][n], w, atol=1e-4, err_msg=n)
    with pytest.raises(ValueError, match="gradient_accumulation_steps"):
        SFTConfig(gradient_accumulation_steps=0)
