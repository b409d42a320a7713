"""Incremental detokenization and the stop-string filter, on their own."""

from __future__ import annotations

from app.engine.text import IncrementalDecoder, StopStringFilter


def feed(filter_: StopStringFilter, pieces: list[str]) -> tuple[list[str], bool]:
    released, hit = [], False
    for piece in pieces:
        text, hit = filter_.push(piece)
        released.append(text)
        if hit:
            break
    if not hit:
        released.append(filter_.flush())
    return released, hit


def test_text_is_cut_before_a_stop_string_split_over_pieces():
    released, hit = feed(StopStringFilter(("END",)), ["Hello E", "N", "D and more"])
    assert hit and "".join(released) == "Hello "
    assert released[0] == "Hello "  # "E" was held back: it may start the stop string


def test_held_back_text_is_released_when_it_turns_out_not_to_stop():
    released, hit = feed(StopStringFilter(("END",)), ["an E", "Nx", " tail"])
    assert not hit and "".join(released) == "an ENx tail"
    assert released[0] == "an "


def test_the_earliest_of_several_stop_strings_wins():
    released, hit = feed(StopStringFilter(("world", "lo w")), ["hello world"])
    assert hit and "".join(released) == "hel"


def test_no_stop_strings_pass_text_through():
    f = StopStringFilter(())
    assert f.push("abc") == ("abc", False)
    assert StopStringFilter(("",)).push("x") == ("x", False)


def test_incremental_decoding_never_splits_a_character(tokenizer):
    text = "naïve café — 日本語 🙂 done"
    ids = tokenizer(text).input_ids
    assert len(ids) > len(text.split()), "the tokenizer should split these characters into byte tokens"
    decoder = IncrementalDecoder(tokenizer, [])
    pieces = [decoder.push(i) for i in ids] + [decoder.flush()]
    assert "".join(pieces) == text
    assert not any("\ufffd" in p for p in pieces)


def test_incremental_decoding_equals_decoding_the_whole_continuation(tokenizer):
    prompt = tokenizer("Hello world").input_ids
    continuation = tokenizer(" and then, some more: 1, 2, 3").input_ids
    decoder = IncrementalDecoder(tokenizer, prompt)
    text = "".join(decoder.push(i) for i in continuation) + decoder.flush()
    assert text == tokenizer.decode(prompt + continuation)[len(tokenizer.decode(prompt)):]
