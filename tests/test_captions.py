"""Captions from dataset labels and edit prompts from interventions, against hand-written strings."""

import math

import pytest

from prism_ray.data.captions import (
    CHEXPERT_LABELS,
    AdapterConfig,
    CheXpertAdapter,
    Intervention,
    LabelColumn,
    RowRejected,
    check_interventions,
    check_selector,
    do,
    edit_words,
    get_adapter,
    parse_intervention,
    parse_interventions,
)

NORMAL = "Normal chest X-ray with no significant findings"


def chexpert_row(**values):
    """All 14 labels 0, with overrides by label name (underscores stand for spaces)."""
    row = {label: 0 for label in CHEXPERT_LABELS}
    for key, value in values.items():
        label = key.replace("_", " ")
        assert label in row, label
        row[label] = value
    return row


def mimic_row(age=67, race="white", sex="F", **labels):
    return {"age": age, "race": race, "sex": sex, **chexpert_row(**labels)}


# ---------------------------------------------------------------- CheXpert


def test_chexpert_lists_positive_labels_in_label_order():
    # Given out of order on purpose: the caption follows the CheXpert column order.
    row = chexpert_row(Support_Devices=1, Cardiomegaly=1, Pleural_Effusion=1.0, Edema="1")
    assert CheXpertAdapter().caption(row) == (
        "Chest X-ray showing Cardiomegaly, Edema, Pleural Effusion, Support Devices"
    )


def test_chexpert_all_zero_row_is_normal():
    assert CheXpertAdapter().caption(chexpert_row()) == NORMAL


@pytest.mark.parametrize(
    "policy, expected",
    [
        ("absent", "Chest X-ray showing Cardiomegaly"),
        ("present", "Chest X-ray showing Cardiomegaly, Pleural Effusion"),
    ],
)
def test_chexpert_uncertain_policy(policy, expected):
    row = chexpert_row(Cardiomegaly=1, Pleural_Effusion=-1)
    assert CheXpertAdapter(uncertain=policy).caption(row) == expected


def test_chexpert_uncertain_drop_rejects_row_naming_column():
    row = chexpert_row(Cardiomegaly=1, Pleural_Effusion="-1.0")
    with pytest.raises(RowRejected, match="Pleural Effusion") as info:
        CheXpertAdapter(uncertain="drop").caption(row)
    assert info.value.column == "Pleural Effusion"
    assert isinstance(info.value, ValueError)


def test_chexpert_uncertain_only_row_is_normal_by_default():
    assert CheXpertAdapter().caption(chexpert_row(Edema=-1)) == NORMAL


@pytest.mark.parametrize("blank", [None, float("nan"), "", "  "])
def test_chexpert_blank_is_absent_by_default(blank):
    row = chexpert_row(Cardiomegaly=1, Edema=blank)
    assert CheXpertAdapter().caption(row) == "Chest X-ray showing Cardiomegaly"
    assert CheXpertAdapter().attributes(row)["Edema"] is False


@pytest.mark.parametrize("blank", [None, float("nan"), ""])
def test_chexpert_blank_drop_rejects_row(blank):
    row = chexpert_row(Cardiomegaly=1, Edema=blank)
    with pytest.raises(RowRejected) as info:
        CheXpertAdapter(blank="drop").caption(row)
    assert info.value.column == "Edema"


def test_chexpert_pandas_row_with_numpy_values_and_pd_na():
    pd = pytest.importorskip("pandas")
    np = pytest.importorskip("numpy")
    frame = pd.DataFrame([chexpert_row(Cardiomegaly=1.0, Edema=math.nan, Fracture=-1.0)])
    row = {column: frame[column].to_numpy()[0] for column in frame.columns}  # numpy scalars
    assert isinstance(row["Cardiomegaly"], np.floating) and math.isnan(row["Edema"])
    assert CheXpertAdapter().caption(row) == "Chest X-ray showing Cardiomegaly"
    row["Fracture"] = np.int64(1)
    row["Edema"] = pd.NA  # what nullable pandas dtypes hold for a blank cell
    assert CheXpertAdapter().caption(row) == "Chest X-ray showing Cardiomegaly, Fracture"
    with pytest.raises(RowRejected) as info:
        CheXpertAdapter(blank="drop").caption(row)
    assert info.value.column == "Edema"


def test_chexpert_no_finding_policies():
    only_no_finding = chexpert_row(No_Finding=1)
    with_device = chexpert_row(No_Finding=1, Support_Devices=1)
    default = CheXpertAdapter()
    literal = CheXpertAdapter(no_finding="as_label")
    assert default.caption(only_no_finding) == NORMAL
    assert default.caption(with_device) == "Chest X-ray showing Support Devices"
    # Paper-literal: No Finding is just another label.
    assert literal.caption(only_no_finding) == "Chest X-ray showing No Finding"
    assert literal.caption(with_device) == "Chest X-ray showing No Finding, Support Devices"
    assert literal.caption(chexpert_row()) == NORMAL


def test_chexpert_bad_value_and_missing_column():
    with pytest.raises(RowRejected, match="Edema") as info:
        CheXpertAdapter().caption(chexpert_row(Edema=2))
    assert info.value.column == "Edema"
    with pytest.raises(RowRejected, match="Edema"):
        CheXpertAdapter().caption(chexpert_row(Edema="yes"))
    row = chexpert_row()
    del row["Fracture"]
    with pytest.raises(ValueError, match="Fracture"):
        CheXpertAdapter().caption(row)


def test_chexpert_custom_prefix_and_normal_text():
    adapter = CheXpertAdapter(prefix="A chest radiograph with ", normal_text="A normal chest radiograph")
    assert adapter.caption(chexpert_row(Edema=1, Fracture=1)) == "A chest radiograph with Edema, Fracture"
    assert adapter.caption(chexpert_row()) == "A normal chest radiograph"


def test_chexpert_attributes_are_canonical_bools():
    attrs = CheXpertAdapter().attributes(chexpert_row(Edema=1.0, Fracture=-1))
    assert list(attrs) == list(CHEXPERT_LABELS)
    assert attrs["Edema"] is True and attrs["Fracture"] is False and attrs["Cardiomegaly"] is False
    assert CheXpertAdapter().render(attrs) == "Chest X-ray showing Edema"


def test_bad_policy_names_the_field():
    with pytest.raises(ValueError, match="uncertain"):
        CheXpertAdapter(uncertain="maybe")
    with pytest.raises(ValueError, match="blank"):
        get_adapter("chexpert", blank="present")


# ---------------------------------------------------------------- MIMIC-CXR


def test_mimic_caption_without_binning():
    row = mimic_row(age=67, race="white", sex="F", Cardiomegaly=1, Support_Devices=1)
    assert get_adapter("mimic").caption(row) == (
        "Chest X-ray of 67-years old white female subject with Cardiomegaly, Support Devices"
    )


def test_mimic_caption_keeps_race_as_given_and_says_no_findings():
    row = mimic_row(age=45.0, race="Black", sex="M")
    assert (
        get_adapter("mimic").caption(row) == "Chest X-ray of 45-years old Black male subject with no findings"
    )


def test_mimic_age_binning_uses_lower_edge():
    adapter = get_adapter("mimic", age_bins=[20, 40, 60, 80])
    assert adapter.caption(mimic_row(age=67, Edema=1)) == (
        "Chest X-ray of 60-years old white female subject with Edema"
    )
    assert adapter.attributes(mimic_row(age=91))["age"] == 80
    assert adapter.attributes(mimic_row(age=40))["age"] == 40
    with pytest.raises(RowRejected) as info:
        adapter.caption(mimic_row(age=18))
    assert info.value.column == "age"


def test_mimic_configurable_columns_and_maps():
    adapter = get_adapter(
        "mimic",
        age_column="anchor_age",
        race_column="ethnicity",
        sex_column="gender",
        race_map={"WHITE": "white"},
    )
    row = {"anchor_age": 70, "ethnicity": "WHITE", "gender": "M", **chexpert_row(Pneumothorax=1)}
    assert adapter.label_columns[:3] == ("anchor_age", "ethnicity", "gender")
    assert adapter.caption(row) == "Chest X-ray of 70-years old white male subject with Pneumothorax"
    with pytest.raises(RowRejected) as info:
        adapter.caption({**row, "gender": None})
    assert info.value.column == "gender"


# ---------------------------------------------------------------- ISIC


def isic_row(diagnosis="MEL", hair=0, gel_bubble=0, ruler=0, ink=0):
    return {"diagnosis": diagnosis, "hair": hair, "gel_bubble": gel_bubble, "ruler": ruler, "ink": ink}


def test_isic_with_artifacts():
    row = isic_row("MEL", hair=True, ruler=1, ink="1")
    assert get_adapter("isic").caption(row) == "a dermoscopic image with melanoma showing hair, ruler, ink"
    row = isic_row("NV", gel_bubble=1.0)
    assert get_adapter("isic").caption(row) == "a dermoscopic image with nevus showing gel bubbles"


def test_isic_without_artifacts():
    assert get_adapter("isic").caption(isic_row("NV", hair=None)) == "a dermoscopic image with nevus"


def test_isic_disease_map_and_unknown_code():
    adapter = get_adapter("isic", disease_map={"MEL": "melanoma", "NV": "melanocytic nevus"})
    assert adapter.caption(isic_row("NV")) == "a dermoscopic image with melanocytic nevus"
    with pytest.raises(RowRejected) as info:
        adapter.caption(isic_row("BCC"))
    assert info.value.column == "diagnosis"


# ---------------------------------------------------------------- interventions


def test_intervention_removes_support_devices():
    adapter = CheXpertAdapter()
    row = chexpert_row(Cardiomegaly=1, Support_Devices=1)
    assert adapter.caption(row) == "Chest X-ray showing Cardiomegaly, Support Devices"
    assert adapter.edit_caption(row, [do("Support Devices", False)]) == "Chest X-ray showing Cardiomegaly"
    # The compact string form gives the same edit.
    assert adapter.edit_caption(row, "Support Devices=0") == "Chest X-ray showing Cardiomegaly"
    # Removing the only finding falls through to the normal caption; adding one lists it in order.
    only_device = chexpert_row(Support_Devices=1)
    assert adapter.edit_caption(only_device, "Support Devices=0") == NORMAL
    assert adapter.edit_caption(only_device, "Cardiomegaly=1") == (
        "Chest X-ray showing Cardiomegaly, Support Devices"
    )


def test_intervention_on_age_and_sex():
    row = mimic_row(age=67, sex="F", Edema=1)
    plain = get_adapter("mimic")
    assert plain.edit_caption(row, "age=80") == "Chest X-ray of 80-years old white female subject with Edema"
    assert plain.edit_caption(row, [do("age", 80), do("sex", "male")]) == (
        "Chest X-ray of 80-years old white male subject with Edema"
    )
    # Interventions go through the same binning and code maps as rows.
    binned = get_adapter("mimic", age_bins=[20, 40, 60, 80])
    assert binned.edit_caption(row, "age=85; sex=M") == (
        "Chest X-ray of 80-years old white male subject with Edema"
    )


def test_intervention_on_isic_disease_and_artifact():
    adapter = get_adapter("isic")
    row = isic_row("MEL", hair=1, ruler=1)
    assert (
        adapter.edit_caption(row, ["disease=NV", "ruler=false"])
        == "a dermoscopic image with nevus showing hair"
    )
    assert adapter.edit_caption(row, "disease=nevus") == "a dermoscopic image with nevus showing hair, ruler"


def test_intervene_does_not_mutate_attributes():
    adapter = CheXpertAdapter()
    attrs = adapter.attributes(chexpert_row(Edema=1))
    edited = adapter.intervene(attrs, "Edema=0")
    assert attrs["Edema"] is True and edited["Edema"] is False
    assert adapter.render(edited) == NORMAL


def test_unknown_attribute_errors_naming_it():
    with pytest.raises(ValueError, match="Pacemaker"):
        CheXpertAdapter().edit_caption(chexpert_row(), "Pacemaker=1")
    with pytest.raises(ValueError, match="'age'"):
        CheXpertAdapter().edit_caption(chexpert_row(), [do("age", 80)])


def test_bad_intervention_values_error_naming_attribute():
    adapter = get_adapter("mimic")
    with pytest.raises(ValueError, match="Support Devices"):
        adapter.edit_caption(mimic_row(), "Support Devices=2")
    with pytest.raises(ValueError, match="age"):
        adapter.edit_caption(mimic_row(), "age=old")
    with pytest.raises(ValueError, match="more than once"):
        adapter.edit_caption(mimic_row(), "age=80; age=20")


def test_parse_compact_interventions():
    assert parse_intervention("Support Devices=0") == Intervention(attribute="Support Devices", value=0)
    assert parse_intervention(" age = 80 ") == do("age", 80)
    assert parse_intervention("sex=male") == do("sex", "male")
    assert parse_intervention("Edema=True") == do("Edema", True)
    assert parse_interventions("Support Devices=0; age=80;sex=male") == [
        do("Support Devices", 0),
        do("age", 80),
        do("sex", "male"),
    ]
    assert parse_interventions(["age=80", do("sex", "male")]) == [do("age", 80), do("sex", "male")]
    assert parse_interventions("") == []
    # str() is the compact form and parses back to the same intervention.
    for intervention in (do("Support Devices", False), do("age", 80), do("sex", "male")):
        assert parse_intervention(str(intervention)) == intervention
    assert str(do("Support Devices", False)) == "Support Devices=false"


@pytest.mark.parametrize(
    "text, message",
    [
        ("age", "no '='"),
        ("=80", "no attribute"),
        ("age=", "no value"),
        ("age=80=1", "more than one"),
    ],
)
def test_parse_intervention_errors(text, message):
    with pytest.raises(ValueError, match=message):
        parse_intervention(text)


def test_intervention_rejects_coerced_values():
    # Strict: the adapter, not pydantic, decides what 0 or "80" mean for an attribute.
    assert do("Edema", 0).value == 0 and do("Edema", 0).value is not False
    with pytest.raises(ValueError):
        do("age", 80.5)
    with pytest.raises(ValueError):
        do("", 1)


# ---------------------------------------------------------------- user templates


def test_template_adapter():
    adapter = get_adapter(
        "template",
        template="Chest X-ray of a {sex} patient showing {findings}",
        findings=["Edema", "Support Devices"],
        value_maps={"sex": {"F": "female", "M": "male"}},
    )
    row = {"sex": "F", "Edema": 1, "Support Devices": -1}
    assert adapter.caption(row) == "Chest X-ray of a female patient showing Edema"
    assert adapter.edit_caption(row, "Edema=0") == "Chest X-ray of a female patient showing no findings"
    assert adapter.edit_caption(row, "sex=M; Support Devices=1") == (
        "Chest X-ray of a male patient showing Edema, Support Devices"
    )
    assert adapter.label_columns == ("sex", "Edema", "Support Devices")


def test_template_adapter_column_mapping_and_empty_text():
    adapter = get_adapter(
        "template",
        template="{age}-year-old, {findings}",
        findings=["Edema"],
        columns={"age": "anchor_age"},
        no_findings="clear lungs",
    )
    assert adapter.caption({"anchor_age": 63.0, "Edema": 0}) == "63-year-old, clear lungs"
    with pytest.raises(RowRejected) as info:
        adapter.caption({"anchor_age": None, "Edema": 0})
    assert info.value.column == "anchor_age"


@pytest.mark.parametrize(
    "options, message",
    [
        ({"template": "X-ray showing {findings}"}, "findings"),
        ({"template": "X-ray of {sex}", "findings": ["Edema"]}, "template"),
        ({"template": "X-ray of {sex!r}"}, "template"),
        ({"template": "X-ray of {}"}, "template"),
        ({"template": "X-ray of {sex}", "columns": {"age": "anchor_age"}}, "age"),
    ],
)
def test_template_settings_errors(options, message):
    with pytest.raises(ValueError, match=message):
        get_adapter("template", **options)


# ---------------------------------------------------------------- registry and configs


def test_registry_and_adapter_config():
    assert type(get_adapter("chexpert")).__name__ == "CheXpertAdapter"
    with pytest.raises(ValueError, match="nope"):
        get_adapter("nope")
    config = AdapterConfig.model_validate({"name": "mimic", "options": {"age_bins": [0, 50]}})
    caption = config.build().caption(mimic_row(age=67))
    assert caption == "Chest X-ray of 50-years old white female subject with no findings"
    with pytest.raises(ValueError, match="bogus"):
        AdapterConfig(name="isic", options={"bogus": 1})
    with pytest.raises(ValueError, match="extra_field"):
        AdapterConfig(name="chexpert", extra_field=1)
    with pytest.raises(ValueError, match="name"):
        AdapterConfig(name="nope")


# ---------------------------------------------------------------- edit words


def test_edit_words():
    source = "Chest X-ray showing Cardiomegaly"
    edited = "Chest X-ray showing Cardiomegaly, Support Devices"
    # Punctuation does not make a word new ("Cardiomegaly," vs "Cardiomegaly": the finding is kept);
    # returned words are exact split(" ") strings, punctuation attached, as P2P locates them.
    assert edit_words(source, edited) == ["Support", "Devices"]
    assert edit_words(edited, source) == []
    assert edit_words("Chest X-ray showing Edema", "Chest X-ray showing Cardiomegaly, Edema") == [
        "Cardiomegaly,"
    ]
    assert edit_words(
        "Chest X-ray of 67-years old white female subject with no findings",
        "Chest X-ray of 80-years old white male subject with no findings",
    ) == ["80-years", "male"]
    assert edit_words("a b", "a  b b c c") == ["c"]
    assert edit_words(source, source) == []


# ---------------------------------------------------------------- label schemas and config checks


@pytest.mark.parametrize(
    "value, parsed",
    [
        (1, 1.0),
        ("1.0", 1.0),
        (" -1 ", -1.0),
        (0.0, 0.0),
        ("", None),
        (None, None),
        (math.nan, None),
        ("NA", None),
    ],
)
def test_finding_cells_that_are_labels(value, parsed):
    assert LabelColumn("Edema", "finding").parse(value) == parsed


@pytest.mark.parametrize("value", ["yes", "True", True, 2, "2", 0.5, "1,0"])
def test_finding_cells_that_are_not(value):
    with pytest.raises(ValueError, match=r"^value '.*' not in \{1, 0, -1, blank\}$"):
        LabelColumn("Edema", "finding").parse(value)


def test_chexpert_rejects_booleans_in_finding_columns():
    # Changed: a Python True used to read as 1. `True` is not one of CheXpert's codes (a manifest
    # that says True cannot say -1), so rows and manifests now agree that it is a bad value.
    with pytest.raises(RowRejected, match="value 'True' not in") as info:
        CheXpertAdapter().caption(chexpert_row(Edema=True))
    assert info.value.column == "Edema"


def test_label_schemas_declare_columns_and_values():
    assert [(c.name, c.kind) for c in get_adapter("chexpert", labels=["Edema"]).label_schema] == [
        ("Edema", "finding")
    ]
    mimic = get_adapter("mimic", labels=["Edema"], race_values=["white", "Black"]).label_schema
    assert [(c.name, c.kind, c.values) for c in mimic] == [
        ("age", "count", None),
        ("race", "text", ("white", "Black")),
        ("sex", "text", ("M", "F", "male", "female")),
        ("Edema", "finding", None),
    ]
    isic = get_adapter("isic").label_schema
    assert isic[0] == LabelColumn("diagnosis", "text", ("MEL", "NV", "melanoma", "nevus"))
    assert {c.kind for c in isic[1:]} == {"flag"}
    template = get_adapter("template", template="{sex}: {findings}", findings=["Edema"]).label_schema
    assert [(c.name, c.kind) for c in template] == [("sex", "scalar"), ("Edema", "finding")]
    assert (
        LabelColumn("hair", "flag").parse("TRUE") is True and LabelColumn("age", "count").parse("63.0") == 63
    )


def test_mimic_sex_and_race_values():
    with pytest.raises(RowRejected, match=r"value 'X' not in \{'M', 'F', 'male', 'female', blank\}") as info:
        get_adapter("mimic").caption(mimic_row(sex="X"))
    assert info.value.column == "sex"
    # Race takes any text unless race_values lists it; listed codes still accept their map's words.
    assert get_adapter("mimic").attributes(mimic_row(race="Pacific Islander"))["race"] == "Pacific Islander"
    strict = get_adapter("mimic", race_values=["W", "B"], race_map={"W": "white"})
    assert strict.attributes(mimic_row(race="W"))["race"] == "white"
    assert strict.edit_caption(mimic_row(race="B"), "race=white").startswith(
        "Chest X-ray of 67-years old white"
    )
    with pytest.raises(RowRejected, match="race"):
        strict.caption(mimic_row(race="white-ish"))


def test_known_attributes():
    assert get_adapter("chexpert").known_attributes() == CHEXPERT_LABELS
    assert get_adapter("mimic", labels=["Edema"]).known_attributes() == ("age", "race", "sex", "Edema")
    assert get_adapter("isic").known_attributes() == ("disease", "hair", "gel bubbles", "ruler", "ink")


def test_check_interventions_names_the_unknown_attribute_and_the_known_ones():
    check_interventions("chexpert", {}, ["Support Devices=0", "Cardiomegaly=1; Edema=0"])
    with pytest.raises(ValueError) as info:
        check_interventions("chexpert", {"labels": ["Edema", "Support Devices"]}, ["Edema=0", "Pacemaker=0"])
    assert str(info.value) == (
        "intervention 'Pacemaker=0': unknown attribute 'Pacemaker' for adapter 'chexpert' "
        "(known: Edema, Support Devices)"
    )
    with pytest.raises(ValueError, match=r"^intervention 'sex=X': attribute 'sex': value 'X' not in"):
        check_interventions("mimic", {}, ["sex=X"])
    with pytest.raises(ValueError, match="^intervention 'Support Devices=2': attribute 'Support Devices'"):
        check_interventions("chexpert", {}, ["Support Devices=2"])
    with pytest.raises(ValueError, match="more than once"):
        check_interventions("mimic", {}, ["age=80; age=20"])
    with pytest.raises(ValueError, match="no '='"):
        check_interventions("mimic", {}, ["age"])


def test_check_selector_rejects_values_a_label_column_cannot_hold():
    check_selector("mimic", {"labels": ["Edema"]}, {"Edema": [1, -1.0], "sex": "M", "split": "anything"})
    with pytest.raises(ValueError, match=r"^column 'Edema': value '2' not in \{1, 0, -1, blank\}$"):
        check_selector("chexpert", {}, {"Edema": [1, 2]})
    with pytest.raises(ValueError, match="column 'Edema': value 'True'"):
        check_selector("chexpert", {}, {"Edema": True})
    with pytest.raises(ValueError, match="column 'sex': value 'X'"):
        check_selector("mimic", {}, {"sex": "X"})
    with pytest.raises(ValueError, match="blank"):
        check_selector("chexpert", {}, {"Edema": ""})


# Relative interventions (the audit's do(sex=flip), do(age=+20)) and MIMIC without race


def test_relative_interventions_act_on_the_row():
    mimic = get_adapter("mimic", labels=["Cardiomegaly"], race_column=None, age_bins=[18, 40, 60, 80])
    row = {"age": 35, "sex": "F", "Cardiomegaly": 1}
    assert mimic.caption(row) == "Chest X-ray of 18-years old female subject with Cardiomegaly"
    assert mimic.edit_caption(row, "sex=flip") == "Chest X-ray of 18-years old male subject with Cardiomegaly"
    assert (
        mimic.edit_caption(row, "age=+20") == "Chest X-ray of 40-years old female subject with Cardiomegaly"
    )
    assert mimic.edit_caption({**row, "age": 65}, "age=+20").startswith("Chest X-ray of 80-years old")
    # The open last bin cannot get older: the caption is unchanged (the audit skips such rows).
    assert mimic.edit_caption({**row, "age": 85}, "age=+20") == mimic.caption({**row, "age": 85})
    assert mimic.edit_caption({**row, "age": 45}, "age=-20").startswith("Chest X-ray of 18-years old")
    assert str(parse_intervention("age=+20")) == "age=+20"
    assert parse_intervention("age=80").value == 80
    plain = get_adapter("mimic", labels=["Cardiomegaly"], race_column=None)
    assert plain.edit_caption({**row, "age": 35}, "age=+20").startswith("Chest X-ray of 55-years old")
    chexpert = get_adapter("chexpert")
    assert chexpert.edit_caption(chexpert_row(Cardiomegaly=1), "Cardiomegaly=flip") == chexpert.caption(
        chexpert_row()
    )


def test_relative_interventions_are_checked_against_the_attribute():
    check_interventions("mimic", {"race_column": None}, ["sex=flip", "age=+20", "Edema=flip"])
    with pytest.raises(ValueError, match="intervention 'Edema=\\+1'.*signed offset"):
        check_interventions("mimic", {}, ["Edema=+1"])
    with pytest.raises(ValueError, match="'race=flip'.*exactly two values"):
        check_interventions("mimic", {}, ["race=flip"])
    with pytest.raises(ValueError, match="unknown attribute 'race'"):
        check_interventions("mimic", {"race_column": None}, ["race=white"])
