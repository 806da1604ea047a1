"""Caption labelling: a held-out zh/en caption set, synthetic captions, the `label` command and its inputs/errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from lora_moe_core.cli.main import main
from lora_moe_core.data.dataset import load_dataset
from lora_moe_core.data.labeling import label_records, read_labels, write_labels
from lora_moe_core.data.synth import generate_dataset
from lora_moe_core.data.vocabulary import Vocabulary
from lora_moe_core.families import FAMILIES
from tests.helpers import assert_one_line_error

_fails_with = assert_one_line_error  # exit 2, one `error:` line naming the words

S, H, SU, OT = "Scissors", "Hook", "Suction", "Other"

# --- 1. held-out caption set -------------------------------------------------------------------------
# Written for this test, independent of tests/test_vocabulary.py. Laparoscopic cholecystectomy style;
# the truth is what an annotator would mark as visible instrument families (FAMILIES order).
ZH_CAPTIONS: list[tuple[str, list[str]]] = [
    # one family
    ("电凝钩沿胆囊床由下向上逐步游离胆囊", [H]),
    ("术者以L型电钩切开胆囊三角区前层腹膜", [H]),
    ("单极电凝钩烧灼胆囊床渗血点", [H]),
    ("电铲平推分离胆囊与肝床之间的疏松组织", [H]),
    ("电凝止血后视野清晰", [H]),
    ("电刀切开胆囊浆膜层", [H]),
    ("电凝棒封闭胆囊床小血管", [H]),
    ("剪刀剪断已夹闭的胆囊管", [S]),
    ("使用弯剪锐性分离胆囊颈部粘连", [S]),
    ("腔镜剪剪开胆囊管前壁，准备行胆道造影", [S]),
    ("组织剪修剪胆囊管残端", [S]),
    ("梅氏剪剪开胆囊管", [S]),
    ("以钩剪离断胆囊动脉远端", [S]),  # trap: 钩剪 is scissors
    ("吸引器吸除胆囊床渗血", [SU]),
    ("吸引管吸净肝下积液", [SU]),
    ("冲洗吸引器反复冲洗术野至冲洗液清亮", [SU]),
    ("用生理盐水冲洗肝下间隙", [SU]),
    ("吸引头置于胆囊窝吸除残余血块", [SU]),
    ("负压吸引清除术野烟雾", [SU]),
    ("冲吸器清除溢出的胆汁", [SU]),
    ("吸引冲洗器冲洗胆囊窝", [SU]),
    ("吸引器头端钝性分离胆囊周围粘连", [SU]),
    ("抓钳夹持胆囊底部向头侧牵拉", [OT]),
    ("无损伤抓钳提起胆囊壶腹部，暴露胆囊三角", [OT]),
    ("分离钳钝性分离胆囊管周围组织", [OT]),
    ("弯分离钳游离胆囊动脉", [OT]),
    ("直角钳绕过胆囊管后方", [OT]),
    ("施夹钳于胆囊管近端放置钛夹", [OT]),
    ("Hem-o-lok夹夹闭胆囊动脉", [OT]),
    ("可吸收夹夹闭胆囊管", [OT]),
    ("持针器夹持缝针缝合胆囊床", [OT]),
    ("将胆囊装入标本袋经脐部切口取出", [OT]),
    ("用纱布压迫胆囊床止血", [OT]),
    ("于肝下放置引流管，经右侧穿刺孔引出", [OT]),
    ("穿刺器置入后镜头进入腹腔", [OT]),
    ("血管闭合器闭合胆囊动脉", [OT]),
    ("胆囊三角用分离钳钝性分离，可见胆囊动脉", [OT]),
    # traps: retractor, bipolar, ultrasonic shears are Other
    ("肝拉钩向上牵开肝脏左叶，暴露肝门", [OT]),
    ("拉钩牵开肝圆韧带", [OT]),
    ("双极电凝钳夹闭胆囊床出血点", [OT]),
    ("双极电凝胆囊动脉分支", [OT]),
    ("超声刀凝闭并切断胆囊周围粘连带", [OT]),
    # the procedure / camera named, no instrument
    ("腹腔镜下胆囊三角解剖清晰", []),
    ("腹腔镜胆囊切除术，气腹建立后探查腹腔", []),
    ("镜头下可见胆囊明显肿大，壁增厚", []),
    ("胆囊管与胆总管汇合部显露清楚", []),
    ("术野可见少量渗血", []),
    ("胆囊床创面无明显出血", []),
    # the procedure name does not hide an instrument
    ("腹腔镜下使用电凝钩打开胆囊三角后腹膜", [H]),
    ("腹腔镜下以吸引器钝性推剥胆囊三角脂肪组织", [SU]),
    # two or three families
    ("抓钳牵拉胆囊颈部，电凝钩分离胆囊三角", [H, OT]),
    ("吸引器吸除积血的同时电钩止血", [H, SU]),
    ("抓钳提起胆囊，剪刀剪断胆囊管", [S, OT]),
    ("钩剪沿钛夹远侧剪断胆囊动脉", [S, OT]),
    ("钛夹夹闭胆囊管后剪断", [S, OT]),
    ("冲洗吸引器冲洗术野，抓钳翻转胆囊检查胆囊床", [SU, OT]),
    ("电凝钩游离胆囊床，吸引器及时吸除烟雾，抓钳向外上方牵拉胆囊", [H, SU, OT]),
    ("肝拉钩牵开肝脏，分离钳游离胆囊管，施夹钳夹闭", [OT]),
    ("双极电凝止血后，剪刀剪开胆囊浆膜", [S, OT]),
    ("超声刀切开浆膜，吸引管吸除渗液", [SU, OT]),
    ("钩剪剪开腹膜，电凝钩继续向上游离", [S, H]),
    ("双极钳夹持出血点电凝止血，吸引器保持视野清晰", [SU, OT]),
    ("术者左手持抓钳，右手持电凝钩", [H, OT]),
    ("电钩与分离钳交替使用分离胆囊管", [H, OT]),
    ("抓钳夹持胆囊，电铲剥离胆囊床，吸引管吸引渗血", [H, SU, OT]),
]

EN_CAPTIONS: list[tuple[str, list[str]]] = [
    ("The electrocautery hook dissects the peritoneum over Calot's triangle.", [H]),
    ("An L-hook is used to open the anterior serosa of the gallbladder.", [H]),
    ("Monopolar cautery is applied to the gallbladder bed.", [H]),
    ("The surgeon uses a spatula to separate the gallbladder from the liver bed.", [H]),
    ("Laparoscopic hook dissection of the gallbladder bed.", [H]),
    ("Diathermy hook used to score the peritoneum.", [H]),
    ("Curved scissors divide the cystic duct.", [S]),
    ("The cystic artery is cut with laparoscopic scissors.", [S]),
    ("Metzenbaum scissors trim adhesions around the fundus.", [S]),
    ("Hook scissors transect the cystic artery.", [S]),  # trap
    ("A suction-irrigation device clears blood from the hepatocystic triangle.", [SU]),
    ("The irrigator washes the subhepatic space.", [SU]),
    ("Pooled blood is aspirated from the gallbladder fossa.", [SU]),
    ("The suction probe evacuates smoke from the field.", [SU]),
    ("The surgeon irrigates the gallbladder fossa and checks for bile leakage.", [SU]),
    ("A grasper holds the fundus and retracts it cephalad.", [OT]),
    ("Atraumatic graspers hold the gallbladder neck.", [OT]),
    ("The Maryland dissector opens the window behind the cystic duct.", [OT]),
    ("A clip applier places two clips on the cystic artery.", [OT]),
    ("The needle driver passes a suture through the trocar site.", [OT]),
    ("The gallbladder is placed into a specimen bag for extraction.", [OT]),
    ("The gallbladder is extracted in a retrieval bag through the umbilical port.", [OT]),
    ("A trocar is inserted under direct vision.", [OT]),
    ("Gauze is used to dab the liver bed.", [OT]),
    # traps
    ("A fan retractor holds the liver edge away from the field.", [OT]),
    ("Bipolar forceps seal a small bleeding vessel.", [OT]),
    ("Bipolar electrocautery of a bleeding point on the liver bed.", [OT]),
    ("Harmonic shears divide the cystic artery.", [OT]),
    ("Harmonic shears coagulate and cut the peritoneal band.", [OT]),
    ("The ultrasonic scalpel seals and divides the peritoneal attachments.", [OT]),
    # no instrument
    ("Laparoscopic cholecystectomy: overview of the operative field.", []),
    ("Laparoscopic view of an inflamed, distended gallbladder.", []),
    ("The critical view of safety is achieved.", []),
    ("Minor oozing from the liver bed, otherwise a dry field.", []),
    ("The camera zooms in on the cystic duct.", []),
    # two or three families
    ("The assistant's grasper pulls the infundibulum laterally as the L-hook opens the posterior peritoneum.", [H, OT]),
    ("Suction and hook alternate to keep the dissection plane dry.", [H, SU]),
    ("The irrigator rinses the field while the grasper lifts the gallbladder.", [SU, OT]),
    ("Scissors cut the cystic duct after the clip applier has placed three clips.", [S, OT]),
    ("Grasper on the fundus, hook on the gallbladder bed, suction clearing smoke.", [H, SU, OT]),
    ("The electrocautery hook coagulates a bleeder while the aspirator removes blood.", [H, SU]),
    ("Bipolar grasper coagulates the cystic artery branch, then scissors divide it.", [S, OT]),
    ("Harmonic shears and a grasper are seen during dissection of the gallbladder from the liver.", [OT]),
]

CAPTIONS = ZH_CAPTIONS + EN_CAPTIONS


def test_caption_set_is_well_formed():
    assert len(CAPTIONS) >= 80
    assert 0.5 <= len(ZH_CAPTIONS) / len(CAPTIONS) <= 0.7
    assert len({text for text, _ in CAPTIONS}) == len(CAPTIONS), "duplicate caption"
    for text, truth in CAPTIONS:
        assert truth == [f for f in FAMILIES if f in truth], f"truth not in FAMILIES order: {text}"
    assert sum(len(truth) >= 2 for _, truth in CAPTIONS) >= 15
    assert sum(not truth for _, truth in CAPTIONS) >= 8


def test_held_out_caption_accuracy():
    vocab = Vocabulary.from_builtin()
    misses = []
    for text, truth in CAPTIONS:
        got = vocab.match(text).families
        if got != truth:
            misses.append(f"{text!r}: expected {truth}, got {got} (matched {vocab.match(text).matched})")
    accuracy = 1 - len(misses) / len(CAPTIONS)
    print(f"exact family-set accuracy {accuracy:.3f} on {len(CAPTIONS)} captions; misses:")
    print("\n".join(misses) or "(none)")
    assert accuracy >= 0.95, "\n".join(misses)


@pytest.mark.parametrize(
    ("text", "truth"),
    [
        ("助手用肝拉钩托起肝脏", [OT]),  # 拉钩 is a retractor, never the hook
        ("钩剪修剪胆囊管", [S]),
        ("双极电凝胆囊床渗血", [OT]),
        ("超声刀游离胆囊", [OT]),
        ("腹腔镜下", []),
        ("laparoscopic", []),
    ],
)
def test_documented_traps(text, truth):
    assert Vocabulary.from_builtin().match(text).families == truth


# --- 2. synthetic captions --------------------------------------------------------------------------


def test_synthetic_captions_label_exactly(tmp_path):
    records = generate_dataset(tmp_path, 24, seed=3, width=32, height=32, num_frames=1)
    labelled, summary = label_records(load_dataset(str(tmp_path)), Vocabulary.from_builtin())
    assert len(labelled) == len(records) == 24
    for record, label in zip(records, labelled, strict=True):
        assert label["video_path"] == record["video_path"]
        assert label["families"] == record["instruments"], record["caption"]
    assert summary.total == 24 and summary.unlabelled == 0
    for family in FAMILIES:
        assert summary.per_family[family] == sum(family in r["instruments"] for r in records)


# --- 3. the label command ---------------------------------------------------------------------------


def _read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def _check_label_fields(label: dict) -> None:
    assert label["families"] == [f for f in FAMILIES if f in label["families"]]
    probs = label["probs"]
    assert len(probs) == len(FAMILIES) and all(isinstance(p, float) for p in probs)
    assert sum(probs) == pytest.approx(1.0)
    if label["families"]:
        share = 1 / len(label["families"])
        assert probs == pytest.approx([share if f in label["families"] else 0.0 for f in FAMILIES])
        assert label["matched"] and all(m in label["caption"] for m in label["matched"])
    else:
        assert probs == pytest.approx([0.25] * 4)
        assert label["matched"] == []


def test_label_command_end_to_end(tmp_path, capsys):
    data, out = tmp_path / "data", tmp_path / "labels" / "labels.jsonl"
    assert main(["synth-data", "--output", str(data), "--num_videos", "8", "--seed", "5",
                 "--width", "32", "--height", "32", "--num_frames", "1"]) == 0  # fmt: skip
    capsys.readouterr()
    manifest = _read_jsonl(data / "manifest.jsonl")
    manifest[2]["caption"] = "胆囊三角解剖清晰，视野良好"  # one caption that names no instrument
    _write_jsonl(data / "manifest.jsonl", manifest)

    assert main(["label", "--dataset", str(data), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    labels = _read_jsonl(out)
    assert len(labels) == len(manifest) == 8
    assert labels == read_labels(str(out))
    for row, label in zip(manifest, labels, strict=True):
        assert {k: label[k] for k in row} == row  # the manifest's fields, unchanged, in the same order
        assert set(label) == set(row) | {"families", "probs", "matched"}
        _check_label_fields(label)
        if row is not manifest[2]:
            assert label["families"] == row["instruments"]
    assert labels[2]["families"] == [] and labels[2]["probs"] == [0.25] * 4
    assert "\\u" not in out.read_text(encoding="utf-8")  # Chinese stays readable

    lines = printed.splitlines()
    assert "labelled 7/8 captions" in printed
    for family in FAMILIES:
        count = sum(family in label["families"] for label in labels)
        assert any(re.match(rf"^{family}\s+{count}\s", line) for line in lines), (family, printed)
    assert any(re.match(r"^none\s+1\s", line) for line in lines), printed
    assert str(out) in printed


def test_write_and_read_labels_round_trip(tmp_path):
    records = [{"video_path": "a.mp4", "caption": "电凝钩", "families": [H], "probs": [0.0, 1.0, 0.0, 0.0],
                "matched": ["电凝钩"], "note": "附加字段"}]  # fmt: skip
    write_labels(records, str(tmp_path / "l.jsonl"))
    assert read_labels(str(tmp_path / "l.jsonl")) == records


# --- 4. dataset inputs --------------------------------------------------------------------------------

FOLDER_CAPTIONS = {
    "case01_a": ("电凝钩分离胆囊三角，抓钳牵拉胆囊\n", [H, OT]),
    "case01_b": ("The irrigator clears the field.", [SU]),
    "case02_a": ("胆囊床无出血", []),
}


def _folder_dataset(root: Path, captions=FOLDER_CAPTIONS) -> Path:
    videos = root / "videos"
    videos.mkdir(parents=True)
    for stem, (caption, _) in captions.items():
        # labelling never decodes; distinct bytes, since byte-identical videos are one video listed twice
        (videos / f"{stem}.mp4").write_bytes(b"\x00garbage, not a video\xff" * 7 + stem.encode())
        (videos / f"{stem}.txt").write_text(caption, encoding="utf-8")
    (root / "dataset.toml").write_text(
        '[general]\nresolution = [64, 48]\ncaption_extension = ".txt"\n\n'
        '[[datasets]]\nvideo_directory = "videos"\ntarget_frames = [17]\n',
        encoding="utf-8",
    )
    return root


@pytest.mark.parametrize("as_file", [False, True])
def test_label_musubi_folder_dataset(tmp_path, capsys, as_file):
    root = _folder_dataset(tmp_path / "ds")
    out = tmp_path / "labels.jsonl"
    dataset = root / "dataset.toml" if as_file else root
    assert main(["label", "--dataset", str(dataset), "--output", str(out)]) == 0
    labels = _read_jsonl(out)
    assert [Path(label["video_path"]).name for label in labels] == [f"{s}.mp4" for s in sorted(FOLDER_CAPTIONS)]
    for label, stem in zip(labels, sorted(FOLDER_CAPTIONS), strict=True):
        caption, truth = FOLDER_CAPTIONS[stem]
        assert label["caption"] == caption.strip()
        assert label["families"] == truth
        _check_label_fields(label)
    assert "labelled 2/3 captions" in capsys.readouterr().out


def test_label_video_jsonl_toml_and_bare_manifest(tmp_path):
    root = tmp_path / "ds"
    (root / "clips").mkdir(parents=True)
    rows = [
        {"video_path": "clips/001.mp4", "caption": "Harmonic shears divide the artery", "case": "P1"},
        {"video_path": "clips/002.mp4", "caption": "吸引管吸除积血，钩剪剪断胆囊管", "case": "P2", "fps": 25},
    ]
    (root / "list.jsonl").write_text(
        json.dumps(rows[0]) + "\n\n" + json.dumps(rows[1], ensure_ascii=False) + "\n", encoding="utf-8"
    )  # a blank line is skipped
    (root / "clips_config.toml").write_text('[[datasets]]\nvideo_jsonl_file = "list.jsonl"\n', encoding="utf-8")
    expected = [[OT], [S, SU]]  # the videos do not even exist: labelling reads captions only
    for dataset in (root / "clips_config.toml", root / "list.jsonl"):
        out = tmp_path / f"{dataset.suffix[1:]}.jsonl"
        assert main(["label", "--dataset", str(dataset), "--output", str(out)]) == 0
        labels = _read_jsonl(out)
        assert [label["families"] for label in labels] == expected
        for row, label in zip(rows, labels, strict=True):
            assert {k: label[k] for k in row} == row  # extra manifest fields are kept


def test_label_toml_with_several_datasets_concatenates(tmp_path):
    root = _folder_dataset(tmp_path / "ds")
    _write_jsonl(root / "extra.jsonl", [{"video_path": "extra/case03.mp4", "caption": "剪刀剪开腹膜"}])
    toml = root / "dataset.toml"
    toml.write_text(toml.read_text(encoding="utf-8") + '\n[[datasets]]\nvideo_jsonl_file = "extra.jsonl"\n',
                    encoding="utf-8")  # fmt: skip
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--dataset", str(toml), "--output", str(out)]) == 0
    assert [label["families"] for label in _read_jsonl(out)] == [[H, OT], [SU], [], [S]]


def test_user_vocabulary_extends_builtin(tmp_path):
    root = tmp_path / "ds"
    root.mkdir()
    _write_jsonl(root / "manifest.jsonl", [
        {"video_path": "a.mp4", "caption": "取石钳取出胆囊管内结石"},
        {"video_path": "b.mp4", "caption": "A Kittner sweeps the fat off the cystic duct"},
        {"video_path": "c.mp4", "caption": "电凝钩游离胆囊床"},
    ])  # fmt: skip
    vocab = tmp_path / "vocab.toml"
    vocab.write_text('[terms]\nother = ["取石钳", "Kittner"]\n', encoding="utf-8")
    plain, extended = tmp_path / "plain.jsonl", tmp_path / "extended.jsonl"
    assert main(["label", "--dataset", str(root), "--output", str(plain)]) == 0
    assert main(["label", "--dataset", str(root), "--output", str(extended), "--vocab", str(vocab)]) == 0
    assert [label["families"] for label in _read_jsonl(plain)] == [[], [], [H]]
    labels = _read_jsonl(extended)
    assert [label["families"] for label in labels] == [[OT], [OT], [H]]  # built-in terms still work
    assert labels[1]["matched"] == ["Kittner"]


# --- 5. bad input -------------------------------------------------------------------------------------


def _manifest_dataset(root: Path, lines: list[str]) -> Path:
    root.mkdir(parents=True)
    (root / "manifest.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return root / "manifest.jsonl"


GOOD_LINE = json.dumps({"video_path": "a.mp4", "caption": "电凝钩分离"}, ensure_ascii=False)


def test_missing_caption_file(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "ds")
    (root / "videos" / "case01_b.txt").unlink()
    out = tmp_path / "labels.jsonl"
    _fails_with(capsys, ["label", "--dataset", str(root), "--output", str(out)], "missing caption file", "case01_b")
    assert not out.exists()


def test_empty_caption_file_labels_the_clip_with_no_family(tmp_path, capsys):
    root = _folder_dataset(tmp_path / "ds")
    (root / "videos" / "case02_a.txt").write_text("  \n", encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    assert main(["label", "--dataset", str(root), "--output", str(out)]) == 0  # per clip, as `cache` is
    assert "1 empty caption(s)" in capsys.readouterr().out
    record = next(r for r in read_labels(str(out)) if "case02_a" in r["video_path"])
    assert record["families"] == [] and record["probs"] == [0.25] * 4 and record["caption"] == ""


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (json.dumps({"video_path": "b.mp4"}), ["missing caption", ":2:"]),
        (json.dumps({"video_path": "../../etc/passwd", "caption": "hook"}), ["../../etc/passwd", "escapes"]),
        (json.dumps({"video_path": "/etc/passwd", "caption": "hook"}), ["/etc/passwd", "relative"]),
        (json.dumps({"caption": "hook"}), ["video_path"]),
        ('{"video_path": "b.mp4", "caption": "hook"', ["not valid JSON", ":2:"]),
        ("not json at all", ["not valid JSON"]),
    ],
    ids=["no-caption", "escape", "absolute", "no-video-path", "truncated-json", "garbage"],
)
def test_bad_manifest_line(tmp_path, capsys, line, words):
    manifest = _manifest_dataset(tmp_path / "ds", [GOOD_LINE, line])
    out = tmp_path / "labels.jsonl"
    _fails_with(capsys, ["label", "--dataset", str(manifest), "--output", str(out)], *words)
    assert not out.exists()


def test_toml_pointing_outside_its_folder(tmp_path, capsys):
    _manifest_dataset(tmp_path / "outside", [GOOD_LINE])
    root = tmp_path / "ds"
    root.mkdir()
    (root / "dataset.toml").write_text('[[datasets]]\nvideo_jsonl_file = "../outside/manifest.jsonl"\n')
    _fails_with(capsys, ["label", "--dataset", str(root), "--output", str(tmp_path / "l.jsonl")], "escapes")


@pytest.mark.parametrize("name", ["nope", "nope.jsonl", "nope.toml"])
def test_missing_dataset(tmp_path, capsys, name):
    out = tmp_path / "labels.jsonl"
    _fails_with(capsys, ["label", "--dataset", str(tmp_path / name), "--output", str(out)], name)
    assert not out.exists()


def test_empty_manifest(tmp_path, capsys):
    manifest = _manifest_dataset(tmp_path / "ds", [""])
    _fails_with(capsys, ["label", "--dataset", str(manifest), "--output", str(tmp_path / "l.jsonl")], "no videos")


@pytest.mark.parametrize(
    ("content", "words"),
    [
        ('[terms\nOther = ["x"]\n', ["malformed vocabulary file"]),
        ('[terms]\nStapler = ["x"]\n', ["'Stapler'", "Scissors"]),
        ('[terms]\nOther = "x"\n', ["list of strings"]),
        ('Other = ["x"]\n', ["[terms]"]),
        (None, ["vocabulary file", "does not exist"]),
    ],
    ids=["toml-syntax", "unknown-family", "not-a-list", "no-table", "missing"],
)
def test_bad_vocab_file(tmp_path, capsys, content, words):
    manifest = _manifest_dataset(tmp_path / "ds", [GOOD_LINE])
    vocab = tmp_path / "vocab.toml"
    if content is not None:
        vocab.write_text(content, encoding="utf-8")
    out = tmp_path / "labels.jsonl"
    argv = ["label", "--dataset", str(manifest), "--output", str(out), "--vocab", str(vocab)]
    _fails_with(capsys, argv, *words)
    assert not out.exists()
