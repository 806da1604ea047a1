"""Caption/prompt keyword labelling: traps, longest match, hints, user vocabulary files."""

from __future__ import annotations

import pytest
import torch

from lora_moe_core.data.vocabulary import LabelMatch, Vocabulary, instrument_logits, parse_instrument_hint
from lora_moe_core.errors import UserError
from lora_moe_core.families import FAMILIES


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    return Vocabulary.from_builtin()


def fams(vocab: Vocabulary, text: str) -> list[str]:
    return vocab.match(text).families


# --- traps -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text",
    ["用肝拉钩牵开肝脏，暴露胆囊三角", "拉钩向上牵拉胆囊底部", "the liver retractor lifts the liver"],
)
def test_retractor_is_other_never_hook(vocab, text):
    assert fams(vocab, text) == ["Other"]


@pytest.mark.parametrize("text", ["钩剪剪断胆囊管", "hook scissors divide the cystic duct", "Hook-scissors"])
def test_hook_scissors_is_scissors_not_hook(vocab, text):
    assert fams(vocab, text) == ["Scissors"]


def test_hook_scissors_matched_terms(vocab):
    assert vocab.match("钩剪剪断胆囊管").matched == ["钩剪", "剪断"]


@pytest.mark.parametrize(
    "text", ["双极电凝钳夹闭出血点", "双极电凝止血", "使用双极止血", "bipolar coagulation of the bleeder"]
)
def test_bipolar_is_other_not_hook(vocab, text):
    m = vocab.match(text)
    assert m.families == ["Other"]
    assert m.energy is True


@pytest.mark.parametrize(
    "text",
    ["超声刀离断胆囊动脉", "ultrasonic shears seal the artery", "Harmonic shears are activated", "harmonic scalpel"],
)
def test_ultrasonic_shears_are_other_not_scissors(vocab, text):
    assert fams(vocab, text) == ["Other"]


def test_plain_shears_are_scissors(vocab):
    assert fams(vocab, "curved shears trim the tissue") == ["Scissors"]


def test_bare_electrocoagulation_is_hook(vocab):
    m = vocab.match("电凝止血，胆囊床渗血")
    assert m.families == ["Hook"]
    assert m.energy is False
    assert fams(vocab, "coagulating the gallbladder bed") == ["Hook"]


def test_bare_electrocoagulation_with_bipolar_elsewhere_is_other_only(vocab):
    m = vocab.match("先用双极夹住血管，再电凝止血")
    assert m.families == ["Other"]
    assert m.matched == ["双极", "电凝"]
    assert fams(vocab, "bipolar grasper holds the vessel, then coagulate") == ["Other"]


def test_monopolar_phrase_stays_hook_even_with_bipolar(vocab):
    assert fams(vocab, "双极钳提起组织，单极电凝切开") == ["Hook", "Other"]


@pytest.mark.parametrize(
    "text",
    [
        "腹腔镜下胆囊切除术",
        "腹腔镜胆囊切除术，胆囊三角解剖",
        "laparoscopic cholecystectomy",
        "view from the laparoscope",
    ],
)
def test_procedure_name_is_no_instrument(vocab, text):
    m = vocab.match(text)
    assert m.families == []
    assert m.matched == []


def test_procedure_name_does_not_hide_instruments(vocab):
    assert vocab.match("腹腔镜下胆囊切除术，电凝钩分离胆囊床").families == ["Hook"]
    assert vocab.match("Laparoscopic cholecystectomy: the hook dissects Calot's triangle").matched == ["hook"]
    assert fams(vocab, "腹腔镜剪刀剪开腹膜") == ["Scissors"]  # 腹腔镜剪刀 is longer than 腹腔镜


# --- matching mechanics ------------------------------------------------------------------------


def test_longest_match_wins(vocab):
    m = vocab.match("冲洗吸引器吸除积血")
    assert m.matched == ["冲洗吸引器", "吸除"]
    assert m.families == ["Suction"]
    assert vocab.match("电凝钩").matched == ["电凝钩"]
    assert vocab.match("L型电钩").matched == ["L型电钩"]


def test_several_families_in_order(vocab):
    m = vocab.match("抓钳提起胆囊，电凝钩分离，吸引器吸除积血，剪刀剪断")
    assert m.families == ["Scissors", "Hook", "Suction", "Other"]
    assert m.matched == ["抓钳", "电凝钩", "吸引器", "吸除", "剪刀", "剪断"]
    assert m.probs == pytest.approx([0.25] * 4)


def test_two_families_probs(vocab):
    m = vocab.match("A grasper retracts the gallbladder while the hook dissects.")
    assert m.families == ["Hook", "Other"]
    assert m.matched == ["grasper", "retracts", "hook"]
    assert m.probs == pytest.approx([0.0, 0.5, 0.0, 0.5])


def test_no_match_is_uniform(vocab):
    m = vocab.match("胆囊三角解剖清晰，视野良好")
    assert m == LabelMatch(families=[], matched=[], probs=[0.25] * 4, energy=False)
    assert len(m.probs) == len(FAMILIES)


def test_english_case_inflections_and_boundaries(vocab):
    assert vocab.match("HOOK and Hooks").matched == ["HOOK", "Hooks"]
    assert fams(vocab, "cutting the duct") == ["Scissors"]
    assert fams(vocab, "aspirating blood; irrigation of the field") == ["Suction"]
    assert fams(vocab, "cauterizing the bed") == ["Hook"]
    assert fams(vocab, "grasping the fundus") == ["Other"]
    assert fams(vocab, "a hooker, shooks, execute, cutter") == []  # word boundaries
    assert fams(vocab, "用hook分离胆囊") == ["Hook"]  # English inside Chinese
    assert fams(vocab, "Suction-Irrigation device") == ["Suction"]
    assert vocab.match("L hook dissection").matched == ["L hook"]


def test_cholec80_tool_names(vocab):
    for name, family in [
        ("Grasper", "Other"),
        ("Bipolar", "Other"),
        ("Hook", "Hook"),
        ("Scissors", "Scissors"),
        ("Clipper", "Other"),
        ("Irrigator", "Suction"),
        ("SpecimenBag", "Other"),
    ]:
        assert fams(vocab, name) == [family], name


# --- hints -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("hint", "expected"),
    [
        ("Hook", ["Hook"]),
        ("hook", ["Hook"]),
        ("Hook/Electrocautery", ["Hook"]),
        ("electrocautery", ["Hook"]),
        ("Suction/Irrigation", ["Suction"]),
        ("irrigation", ["Suction"]),
        ("scissors", ["Scissors"]),
        ("Other", ["Other"]),
        ("grasper", ["Other"]),
        ("Hook+Suction", ["Hook", "Suction"]),
        ("Hook,Suction", ["Hook", "Suction"]),
        ("Suction, hook", ["Hook", "Suction"]),
        ("电凝钩", ["Hook"]),
        ("拉钩", ["Other"]),
        ("none", []),
    ],
)
def test_parse_instrument_hint(hint, expected):
    assert parse_instrument_hint(hint) == expected


@pytest.mark.parametrize("hint", ["Stapler-ish", "laparoscope", "grasper and hook", "", "Hook+"])
def test_unknown_hint_is_one_line_user_error(hint):
    with pytest.raises(UserError) as err:
        parse_instrument_hint(hint)
    msg = str(err.value)
    assert "\n" not in msg
    for name in ("Scissors", "Hook/Electrocautery", "electrocautery", "Suction/Irrigation", "irrigation", "grasper"):
        assert name in msg


def test_unknown_hint_names_the_hint():
    with pytest.raises(UserError, match=r"unknown instrument hint 'frobnicator'; valid: Scissors"):
        parse_instrument_hint("frobnicator")


def test_slash_mixing_families_is_error():
    with pytest.raises(UserError, match="mixes families"):
        parse_instrument_hint("Hook/Suction")


# --- logits ------------------------------------------------------------------------------------


def test_instrument_logits():
    t = instrument_logits(["Hook", "Suction"])
    assert t.shape == (4,)
    assert torch.equal(t, torch.tensor([0.0, 5.0, 5.0, 0.0]))
    assert torch.equal(instrument_logits([]), torch.zeros(4))
    assert torch.equal(
        instrument_logits(parse_instrument_hint("scissors"), confidence=2.0), torch.tensor([2.0, 0.0, 0.0, 0.0])
    )
    with pytest.raises(UserError):
        instrument_logits(["Stapler"])


# --- user vocabulary ---------------------------------------------------------------------------


def test_load_user_vocabulary(tmp_path):
    path = tmp_path / "vocab.toml"
    path.write_text('[terms]\nScissors = ["新剪"]\nother = ["endo bag"]\nIgnore = ["钩住"]\n', encoding="utf-8")
    vocab = Vocabulary.load(path)
    assert vocab.match("新剪剪开腹膜").matched == ["新剪", "剪开"]
    assert vocab.match("新剪剪开腹膜").families == ["Scissors"]
    assert vocab.match("Endo-bags are used").families == ["Other"]
    assert "新剪" in vocab.terms("Scissors")
    assert parse_instrument_hint("新剪", vocabulary=vocab) == ["Scissors"]
    # The built-in vocabulary is not changed by loading a user file.
    assert Vocabulary.from_builtin().match("新剪").families == []


def test_user_term_overrides_builtin_family():
    vocab = Vocabulary.from_builtin().extend({"Other": ["电凝"]})
    assert vocab.match("电凝止血").families == ["Other"]


def test_bad_vocab_unknown_family(tmp_path):
    path = tmp_path / "bad.toml"
    path.write_text('[terms]\nStapler = ["x"]\n', encoding="utf-8")
    with pytest.raises(UserError) as err:
        Vocabulary.load(path)
    msg = str(err.value)
    assert "'Stapler'" in msg and "Scissors, Hook, Suction, Other" in msg and "\n" not in msg


@pytest.mark.parametrize(
    "content",
    ['[terms\nScissors = ["x"]\n', 'Scissors = ["x"]\n', '[terms]\nScissors = "x"\n', '[terms]\nHook = [""]\n'],
)
def test_bad_vocab_files(tmp_path, content):
    path = tmp_path / "bad.toml"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(UserError) as err:
        Vocabulary.load(path)
    assert "\n" not in str(err.value)


def test_missing_vocab_file(tmp_path):
    with pytest.raises(UserError, match=r"vocabulary file .*nope.toml does not exist"):
        Vocabulary.load(tmp_path / "nope.toml")
