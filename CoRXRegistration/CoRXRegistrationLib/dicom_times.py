"""Hours after injection from DICOM headers: the acquisition time of each SPECT and the
radiopharmaceutical start (injection) time, and the CT of the same session.

Conventions: a time point's hours are the SPECT acquisition *start* minus the injection time
(``Radiopharmaceutical Start DateTime`` (0018,1078) in the NM file's Radiopharmaceutical
Information Sequence, or given by the user). Times are clock times as written in the headers; where
a header states its UTC offset (a DT value's "+HHMM" suffix, or Timezone Offset From UTC (0008,0201))
and the offsets differ, every time is put on UTC first; a series where some times state an offset
and others, on another clock, do not is refused. A typed injection time is read on the clock of the
first SPECT. Nothing is guessed: a start time without a date, SPECTs that disagree on the injection, or a
SPECT without a CT acquired within ``max_ct_gap_h`` raise :class:`DicomTimeError`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

SPECT_MODALITIES = ("NM", "PT")


class DicomTimeError(ValueError):
    """The headers do not give the hours after injection unambiguously."""


@dataclass(frozen=True)
class DicomTiming:
    """What one volume's header says about when it was acquired."""
    modality: str
    acquisition: datetime
    acquisition_source: str            # which attribute gave it
    injection: datetime | None         # NM/PT files only, when the header holds a dated start time
    injection_time_only: str | None = None   # a start time without a date (not usable alone)
    acquisition_utc_offset: timedelta | None = None   # the header's clock, where it says
    injection_utc_offset: timedelta | None = None


_DA = re.compile(r"^(\d{4})\.?(\d{2})\.?(\d{2})$")
_TM = re.compile(r"^(\d{2})(?::?(\d{2}))?(?::?(\d{2}))?(?:\.(\d{1,6}))?$")
_DT = re.compile(r"^(\d{4})(\d{2})?(\d{2})?(\d{2})?(\d{2})?(\d{2})?(?:\.(\d{1,6}))?([+-]\d{4})?$")
_OFFSET = re.compile(r"^([+-])(\d{2})(\d{2})$")


def _fraction_us(text) -> int:
    return int((text or "0").ljust(6, "0"))


def _datetime(parts, what: str, value) -> datetime:
    try:
        return datetime(*parts)
    except ValueError as exc:                        # month 13, 25 o'clock, ...
        raise DicomTimeError(f"{what} {value!r} is not a valid date or time ({exc})") from None


def parse_utc_offset(value: str) -> timedelta:
    """A DICOM UTC offset "+HHMM" / "-HHMM" (Timezone Offset From UTC, or a DT suffix)."""
    m = _OFFSET.match(str(value).strip())
    if m is None or int(m[2]) > 14 or int(m[3]) > 59:
        raise DicomTimeError(f"not a DICOM UTC offset (+HHMM or -HHMM): {value!r}")
    delta = timedelta(hours=int(m[2]), minutes=int(m[3]))
    return delta if m[1] == "+" else -delta


def parse_da_tm(date: str, time: str) -> datetime:
    """A DICOM DA ("YYYYMMDD", legacy "YYYY.MM.DD") and TM ("HHMMSS.FFFFFF", "HHMM", "HH",
    legacy "HH:MM:SS") pair as one datetime."""
    d, t = _DA.match(str(date).strip()), _TM.match(str(time).strip())
    if d is None:
        raise DicomTimeError(f"not a DICOM date (DA): {date!r}")
    if t is None:
        raise DicomTimeError(f"not a DICOM time (TM): {time!r}")
    return _datetime((int(d[1]), int(d[2]), int(d[3]), int(t[1]), int(t[2] or 0), int(t[3] or 0),
                      _fraction_us(t[4])), "date/time", f"{date} {time}")


def parse_dt_offset(value: str) -> tuple:
    """A DICOM DT ("YYYYMMDDHHMMSS.FFFFFF&ZZXX", any trailing precision) as (datetime, UTC offset or None)."""
    m = _DT.match(str(value).strip())
    if m is None or m[3] is None:
        raise DicomTimeError(f"not a dated DICOM date-time (DT): {value!r}")
    when = _datetime((int(m[1]), int(m[2]), int(m[3]), int(m[4] or 0), int(m[5] or 0), int(m[6] or 0),
                      _fraction_us(m[7])), "date-time (DT)", value)
    return when, (parse_utc_offset(m[8]) if m[8] else None)


def parse_dt(value: str) -> datetime:
    """A DICOM DT as a datetime on its own clock (see :func:`parse_dt_offset` for the offset)."""
    return parse_dt_offset(value)[0]


def parse_user_datetime(text: str) -> datetime:
    """An injection time typed by a person: ISO "YYYY-MM-DD HH:MM[:SS]" or a DICOM DT."""
    text = str(text).strip()
    for fmt in ("%Y-%m-%d %H:%M:%S", "%Y-%m-%d %H:%M", "%Y-%m-%dT%H:%M:%S", "%Y-%m-%dT%H:%M"):
        try:
            return datetime.strptime(text, fmt)
        except ValueError:
            pass
    try:
        return parse_dt(text)
    except DicomTimeError:
        raise DicomTimeError(f"injection time {text!r}: write it as YYYY-MM-DD HH:MM") from None


def _text(ds, keyword):
    value = getattr(ds, keyword, None)
    return str(value).strip() if value not in (None, "") else None


def _tagged(parse, keyword: str, *values):
    """Parse header values, naming the attribute when they are not valid DICOM."""
    try:
        return parse(*values)
    except DicomTimeError as exc:
        raise DicomTimeError(f"{keyword}: {exc}") from None


def timing_from_dataset(ds) -> DicomTiming:
    """:class:`DicomTiming` of a pydicom dataset (header only is enough)."""
    modality = _text(ds, "Modality") or "?"
    default_offset = _tagged(parse_utc_offset, "TimezoneOffsetFromUTC (0008,0201)",
                             _text(ds, "TimezoneOffsetFromUTC")) if _text(ds, "TimezoneOffsetFromUTC") else None
    acquisition = source = None
    acquisition_offset = default_offset
    if _text(ds, "AcquisitionDateTime"):
        acquisition, offset = _tagged(parse_dt_offset, "AcquisitionDateTime (0008,002A)",
                                      _text(ds, "AcquisitionDateTime"))
        source, acquisition_offset = "AcquisitionDateTime", offset or default_offset
    else:
        for date_kw, time_kw in (("AcquisitionDate", "AcquisitionTime"), ("SeriesDate", "SeriesTime"),
                                 ("ContentDate", "ContentTime")):
            if _text(ds, date_kw) and _text(ds, time_kw):
                acquisition = _tagged(parse_da_tm, f"{date_kw}/{time_kw}", _text(ds, date_kw), _text(ds, time_kw))
                source = f"{date_kw}/{time_kw}"
                break
    if acquisition is None:
        raise DicomTimeError("the header has no acquisition, series or content date and time")
    injection = time_only = injection_offset = None
    if modality in SPECT_MODALITIES:
        for item in getattr(ds, "RadiopharmaceuticalInformationSequence", None) or []:
            if _text(item, "RadiopharmaceuticalStartDateTime"):
                injection, offset = _tagged(parse_dt_offset, "RadiopharmaceuticalStartDateTime (0018,1078)",
                                            _text(item, "RadiopharmaceuticalStartDateTime"))
                injection_offset = offset or default_offset
                break
            time_only = time_only or _text(item, "RadiopharmaceuticalStartTime")
    return DicomTiming(modality, acquisition, source, injection, time_only, acquisition_offset, injection_offset)


def on_one_clock(timings: dict) -> tuple:
    """(timings, moved to UTC): acquisition and injection on one clock, unchanged where every stated UTC
    offset is the same (or none is stated), else moved to UTC. Refuses a mix of times with and without
    an offset when the stated offsets differ."""
    stated = {o for t in timings.values() for o in (t.acquisition_utc_offset, t.injection_utc_offset)
              if o is not None}
    if len(stated) <= 1:
        return dict(timings), False
    unknown = sorted(n for n, t in timings.items() if t.acquisition_utc_offset is None
                     or (t.injection is not None and t.injection_utc_offset is None))
    if unknown:
        raise DicomTimeError(f"the headers state different UTC offsets ({', '.join(_offset_text(o) for o in stated)})"
                             f" but {unknown[0]!r} states none: its clock is unknown; enter the injection time and "
                             "check the acquisition times")
    out = {}
    for name, t in timings.items():
        out[name] = DicomTiming(t.modality, t.acquisition - t.acquisition_utc_offset, t.acquisition_source,
                                None if t.injection is None else t.injection - t.injection_utc_offset,
                                t.injection_time_only, timedelta(0), None if t.injection is None else timedelta(0))
    return out, True


def _offset_text(offset: timedelta) -> str:
    minutes = int(offset.total_seconds() // 60)
    return f"{'+' if minutes >= 0 else '-'}{abs(minutes) // 60:02d}{abs(minutes) % 60:02d}"


def read_dicom_timing(path) -> DicomTiming:
    """:class:`DicomTiming` of one DICOM file (pixel data are not read)."""
    import pydicom
    try:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
    except Exception as e:                                   # pydicom raises several kinds
        raise DicomTimeError(f"{path}: not a readable DICOM file ({e})") from e
    try:
        return timing_from_dataset(ds)
    except DicomTimeError as e:
        raise DicomTimeError(f"{path}: {e}") from None


def hours_after_injection(timings: dict, injection: datetime | None = None) -> tuple:
    """({SPECT name: hours after injection}, injection datetime) from ``{volume name: DicomTiming}``
    (CTs may be among them: they are put on the same clock). ``injection`` (the user's, on the
    first SPECT's clock) overrides the headers; without it every SPECT must state the same dated
    start time (within one minute). Timings on one clock are returned as the third item."""
    spects = {n: t for n, t in timings.items() if t.modality in SPECT_MODALITIES}
    if not spects:
        raise DicomTimeError("no SPECT (modality NM) among the DICOM volumes")
    first_spect = min(spects.values(), key=lambda t: t.acquisition)
    timings, on_utc = on_one_clock(timings)
    if injection is not None and on_utc:
        injection = injection - first_spect.acquisition_utc_offset      # typed on the first SPECT's clock
    spects = {n: t for n, t in timings.items() if t.modality in SPECT_MODALITIES}
    if injection is None:
        stated = {n: t.injection for n, t in spects.items() if t.injection is not None}
        if len(stated) < len(spects):
            missing = sorted(set(spects) - set(stated))
            time_only = [n for n in missing if spects[n].injection_time_only]
            why = (f"{time_only[0]!r} gives a radiopharmaceutical start time without a date" if time_only
                   else f"{missing[0]!r} has no radiopharmaceutical start date-time")
            raise DicomTimeError(f"{why}; enter the injection date and time")
        first = min(stated.values())
        if max(stated.values()) - first > timedelta(minutes=1):
            detail = ", ".join(f"{n}: {v:%Y-%m-%d %H:%M}" for n, v in sorted(stated.items()))
            raise DicomTimeError(f"the SPECTs state different injection times ({detail}): "
                                 "not one administration; enter the injection date and time")
        injection = first
    hours = {}
    for name, t in spects.items():
        h = (t.acquisition - injection).total_seconds() / 3600.0
        if h < 0:
            raise DicomTimeError(f"{name!r} was acquired {t.acquisition:%Y-%m-%d %H:%M}, before the injection "
                                 f"({injection:%Y-%m-%d %H:%M})")
        hours[name] = h
    return hours, injection, timings


def series_from_dicom_timings(timings: dict, injection: datetime | None = None,
                              max_ct_gap_h: float = 2.0) -> list:
    """[(hours after injection, CT name, SPECT name)] in time order from ``{volume name: DicomTiming}``.

    SPECT = modality NM (or PT); each is paired with the CT acquired nearest to it within
    ``max_ct_gap_h`` (the CT of the same SPECT/CT session), each CT used once. Hours as
    :func:`hours_after_injection`."""
    hours, _, timings = hours_after_injection(timings, injection)
    cts = {n: t for n, t in timings.items() if t.modality == "CT"}
    rows, used = [], set()
    for name in sorted(hours, key=lambda n: timings[n].acquisition):
        t = timings[name]
        gaps = sorted((abs((c.acquisition - t.acquisition).total_seconds()) / 3600.0, n)
                      for n, c in cts.items() if n not in used)
        if not gaps or gaps[0][0] > max_ct_gap_h:
            raise DicomTimeError(f"no CT acquired within {max_ct_gap_h:g} h of SPECT {name!r} "
                                 f"({t.acquisition:%Y-%m-%d %H:%M})")
        used.add(gaps[0][1])
        rows.append((round(hours[name], 2), gaps[0][1], name))
    return rows
