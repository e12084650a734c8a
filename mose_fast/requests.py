"""Edit requests: validation and readers for the ROME, EasyEdit and MEND/zsRE schemas.

A request is normalised to a *template* holding ``{}`` where the subject stands, as in ROME
(``"The mother tongue of {} is"``); the subject's last token is where keys are read and the
target vector is written.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Sequence


@dataclass
class EditRequest:
    prompt: str                       # with the subject written out, or with a "{}" placeholder
    subject: str
    target_new: str
    target_true: str | None = None
    paraphrase_prompts: Sequence[str] = field(default_factory=tuple)    # full sentences
    neighborhood_prompts: Sequence[str] = field(default_factory=tuple)  # full sentences
    neighborhood_answers: Sequence[str] = field(default_factory=tuple)  # their true answers
    case_id: Any = None

    def __post_init__(self) -> None:
        for name in ("prompt", "subject", "target_new"):
            _check_text(self, name, getattr(self, name))
        if self.target_true is not None:
            _check_text(self, "target_true", self.target_true)
        for name in ("paraphrase_prompts", "neighborhood_prompts", "neighborhood_answers"):
            values = getattr(self, name)
            if isinstance(values, str):
                values = (values,)
            values = tuple(values)
            for i, v in enumerate(values):
                _check_text(self, f"{name}[{i}]", v)
            object.__setattr__(self, name, values)
        if "{}" not in self.prompt and self.subject not in self.prompt:
            raise ValueError(f"{self._name()}: subject {self.subject!r} does not occur in prompt {self.prompt!r} "
                             "(write it out, or put a '{}' placeholder where it stands)")
        if self.prompt.count("{}") > 1:
            raise ValueError(f"{self._name()}: prompt has more than one '{{}}' placeholder: {self.prompt!r}")

    # --- derived forms -----------------------------------------------------------------------
    @property
    def template(self) -> str:
        """The prompt with ``{}`` in place of the subject (its first occurrence)."""
        if "{}" in self.prompt:
            return self.prompt
        i = self.prompt.index(self.subject)
        return self.prompt[:i] + "{}" + self.prompt[i + len(self.subject):]

    @property
    def text(self) -> str:
        """The rewrite prompt as a sentence."""
        return fill(self.template, self.subject)

    def _name(self) -> str:
        return f"EditRequest(case_id={self.case_id!r})" if self.case_id is not None else \
            f"EditRequest(prompt={getattr(self, 'prompt', None)!r})"

    def validate_tokens(self, tok) -> None:
        """Checks that need the tokenizer: the subject and target must produce tokens."""
        if len(tok(self.subject, add_special_tokens=False)["input_ids"]) == 0:
            raise ValueError(f"{self._name()}: field 'subject' ({self.subject!r}) tokenises to nothing")
        if len(tok(" " + self.target_new.strip(), add_special_tokens=False)["input_ids"]) == 0:
            raise ValueError(f"{self._name()}: field 'target_new' ({self.target_new!r}) tokenises to nothing")

    def to_dict(self) -> dict[str, Any]:
        return dict(case_id=self.case_id, prompt=self.prompt, subject=self.subject, target_new=self.target_new,
                    target_true=self.target_true, paraphrase_prompts=list(self.paraphrase_prompts),
                    neighborhood_prompts=list(self.neighborhood_prompts),
                    neighborhood_answers=list(self.neighborhood_answers))


def fill(template: str, subject: str) -> str:
    # str.replace, not str.format: subjects and generated prefixes may contain braces.
    return template.replace("{}", subject, 1)


def _check_text(req: EditRequest, name: str, value: Any) -> None:
    if not isinstance(value, str):
        raise ValueError(f"{req._name()}: field {name!r} must be a string, got {type(value).__name__}")
    if not value.strip():
        raise ValueError(f"{req._name()}: field {name!r} is empty or only whitespace ({value!r})")


# --- schema readers ----------------------------------------------------------------------------

def _str_field(rw: dict, name: str) -> str:
    value = rw[name]
    if not isinstance(value, dict) or "str" not in value:
        raise KeyError(f"{name}.str")
    return value["str"]


def from_rome(record: dict) -> EditRequest:
    """ROME/MEMIT: a CounterFact record ``{"case_id", "requested_rewrite": {...}, "paraphrase_prompts",
    ...}``, or the bare request their ``apply_rome_to_model``/``apply_memit_to_model`` take:
    ``{"prompt": "{} ...", "subject", "target_new": {"str"}, "target_true": {"str"} (optional)}``."""
    rw = record.get("requested_rewrite", record)
    true = _str_field(rw, "target_true") if "requested_rewrite" in record or rw.get("target_true") is not None else None
    neighbours = record.get("neighborhood_prompts", ())
    return EditRequest(
        prompt=rw["prompt"], subject=rw["subject"], target_new=_str_field(rw, "target_new"), target_true=true,
        paraphrase_prompts=record.get("paraphrase_prompts", ()),
        neighborhood_prompts=neighbours,
        neighborhood_answers=[true] * len(neighbours) if true is not None else (),
        case_id=record.get("case_id"))


def from_easyedit(record: dict) -> EditRequest:
    """EasyEdit flat schema: ``prompt, subject, target_new, ground_truth, rephrase_prompt, locality_prompt``."""
    def as_list(v):
        return [] if v is None else ([v] if isinstance(v, str) else list(v))
    loc = as_list(record.get("locality_prompt"))
    loc_ans = as_list(record.get("locality_ground_truth"))
    if loc and not loc_ans and record.get("ground_truth") is not None:
        loc_ans = [record["ground_truth"]] * len(loc)   # CounterFact neighbours share the true object
    return EditRequest(
        prompt=record["prompt"], subject=record["subject"], target_new=record["target_new"],
        target_true=record.get("ground_truth"),
        paraphrase_prompts=as_list(record.get("rephrase_prompt")),
        neighborhood_prompts=loc, neighborhood_answers=loc_ans, case_id=record.get("case_id"))


def from_mend(record: dict) -> EditRequest:
    """MEND/zsRE: ``subject, src, alt, answers, rephrase, loc, loc_ans``.

    EasyEdit convention: the new answer is ``alt`` and ``answers[0]`` the original one.
    """
    return EditRequest(
        prompt=record["src"], subject=record["subject"], target_new=record["alt"],
        target_true=(record.get("answers") or [None])[0],
        paraphrase_prompts=[record["rephrase"]] if record.get("rephrase") else [],
        neighborhood_prompts=[record["loc"]] if record.get("loc") else [],
        neighborhood_answers=[record["loc_ans"]] if record.get("loc_ans") else [],
        case_id=record.get("case_id"))


def detect_schema(record: dict) -> str:
    if "requested_rewrite" in record or "prompt" in record and isinstance(record.get("target_new"), dict):
        return "rome"
    if "src" in record and "alt" in record:
        return "mend"
    if "prompt" in record and "target_new" in record:
        return "easyedit"
    raise ValueError(f"unrecognised edit-request schema with keys {sorted(record)}: expected ROME "
                     "('requested_rewrite', or 'prompt','subject','target_new': {'str'}), "
                     "EasyEdit ('prompt','subject','target_new',...) or MEND "
                     "('src','alt','answers',...)")


READERS = {"rome": from_rome, "easyedit": from_easyedit, "mend": from_mend}


def parse_records(records: Iterable[dict], start: int = 0) -> list[EditRequest]:
    """Requests from records; ``start`` is the first record's position in its file.  A MEND/zsRE
    record without a ``case_id`` gets its position (as MEMIT's zsRE loader numbers them)."""
    out = []
    for i, rec in enumerate(records, start):
        if not isinstance(rec, dict):
            raise ValueError(f"request #{i} is a {type(rec).__name__}, expected a JSON object")
        try:
            schema = detect_schema(rec)
        except ValueError as e:
            raise ValueError(f"request #{i}: {e}") from None
        if schema == "mend" and rec.get("case_id") is None:
            rec = {**rec, "case_id": i}
        try:
            out.append(READERS[schema](rec))
        except KeyError as e:
            raise ValueError(f"request #{i} ({schema} schema) lacks field {e}") from None
        except (TypeError, AttributeError) as e:
            raise ValueError(f"request #{i} ({schema} schema): malformed field ({e})") from None
        except ValueError as e:
            raise ValueError(f"request #{i}: {e}") from None
    return out


def _read_records(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as first:
        data = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                data.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"requests file {path}: not JSON ({first}) "
                                 f"nor JSON lines (line {n} does not parse)") from None
    if isinstance(data, dict):
        data = [data]
    if not isinstance(data, list):
        raise ValueError(f"requests file {path}: expected a JSON list of request objects, got {type(data).__name__}")
    return data


def _check_range(path: Path, limit: int | None, offset: int) -> None:
    if not path.is_file():
        raise FileNotFoundError(f"requests file {path} not found")
    if limit is not None and limit < 1 or offset < 0:
        raise ValueError(f"requests file {path}: limit must be ≥ 1 and offset ≥ 0 (got {limit}, {offset})")


def load_requests(path: str | Path, limit: int | None = None, offset: int = 0) -> list[EditRequest]:
    """Read a JSON list (or JSON-lines) of requests in any of the three schemas.  Errors name the
    file, the record and the field."""
    path = Path(path)
    _check_range(path, limit, offset)
    data = _read_records(path)[offset: None if limit is None else offset + limit]
    if not data:
        raise ValueError(f"requests file {path}: no requests (offset {offset}, limit {limit})")
    try:
        return parse_records(data, offset)
    except ValueError as e:
        raise ValueError(f"requests file {path}: {e}") from None


def load_benchmark(path: str | Path, limit: int | None = None, offset: int = 0
                   ) -> tuple[list[EditRequest], list[tuple[int, str]]]:
    """A benchmark file's first ``limit`` usable requests from record ``offset`` on, and the records
    passed over as ``(position, reason)``: a published dataset can hold a record that is no edit
    (zsRE's ``zsre_mend_train-1k.json`` has two with an empty new answer ``alt``).  Fewer usable
    records than ``limit`` is an error naming the file, the count and the records passed over."""
    path = Path(path)
    _check_range(path, limit, offset)
    data = _read_records(path)
    out, skipped = [], []
    for i in range(offset, len(data)):
        if limit is not None and len(out) == limit:
            break
        try:
            out.extend(parse_records([data[i]], i))
        except ValueError as e:
            skipped.append((i, str(e)))
    if not out or limit is not None and len(out) < limit:
        passed = "; ".join(f"#{i}: {why}" for i, why in skipped[:5]) + (" …" if len(skipped) > 5 else "")
        asked = "" if limit is None else f", {limit} asked"
        raise ValueError(f"requests file {path}: {len(out)} usable requests from record {offset} on{asked}"
                         + (f" ({len(skipped)} passed over: {passed})" if skipped else ""))
    return out, skipped
