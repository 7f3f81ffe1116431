"""Load-and-soak test of a live server: N requests at concurrency C, valid and invalid mixed.

    python -m client.soak --target triton --url 127.0.0.1:8001 --out artifacts/soak
    python -m client.soak --target openai --url http://127.0.0.1:9000 --requests 2000 --time-limit 1800

Valid requests (text only, one image or two, streamed or not) must succeed; invalid ones (one
broken value or input each, see the targets' INVALID_KINDS) must be refused: one that succeeds is
reported as `unexpected_success`. A request in flight at --time-limit runs to its end; no new one
starts after it. The exit code is 1 when a valid request failed, else 0.

Memory (client/memory_sampler.py says how it is read): every --rss-interval s, RSS, USS and PSS of each
tracked process and its children, and the bytes the server's /dev/shm regions hold; `rss_bounded`
is its verdict. --warmup requests go first, unmeasured (their failures still count).

Writes soak.json (counts, error classes, latencies, memory, every request) and soak.png into --out.
"""

from __future__ import annotations

import argparse
import base64
import json
import random
import re
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from build.settings import HelpFormatter
from client.memory_sampler import FIELDS, MIB, RssSampler, default_pids, rss_summary
from client.synthetic import synthetic_image

VALID_KINDS = ("text", "1 image", "2 images")
QUESTION = "Describe the image."
TWO_IMAGES = "Image-1: <image>\nImage-2: <image>\nCompare the two images."
IMAGE_SIZES = ((320, 240), (448, 448), (640, 480), (1024, 768), (200, 600))
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")


@dataclass(frozen=True)
class Job:
    index: int
    valid: bool
    kind: str  # a VALID_KINDS entry, or the target's INVALID_KINDS entry
    stream: bool
    seed: int


@dataclass
class Outcome:
    job: Job
    start: float  # seconds since the soak started
    end: float
    first: float | None  # arrival of the first piece of text
    error: str | None  # error_class() of what the request raised


def make_plan(requests: int, invalid_fraction: float, stream_fraction: float, seed: int, invalid_kinds: tuple[str, ...]) -> list[Job]:
    """round(requests × invalid_fraction) invalid jobs cycling through every kind, shuffled among valid ones."""
    rng = random.Random(seed)
    invalid = round(requests * invalid_fraction)
    kinds = [invalid_kinds[i % len(invalid_kinds)] for i in range(invalid)] + [rng.choice(VALID_KINDS) for _ in range(requests - invalid)]
    valid = [False] * invalid + [True] * (requests - invalid)
    order = rng.sample(range(requests), requests)
    return [Job(i, valid[k], kinds[k], rng.random() < stream_fraction, rng.randrange(2**31)) for i, k in enumerate(order)]


def error_class(error: BaseException) -> str:
    """The exception's class and the first 60 characters of its message, ids and long numbers replaced, so one refusal of many requests counts as one class."""
    body = getattr(error, "body", None)  # openai.APIStatusError: the server's JSON; its str() adds the status
    inner = body.get("error", body) if isinstance(body, dict) else None
    message = (inner.get("message") or inner.get("detail") or inner) if isinstance(inner, dict) else inner or str(error)
    message = re.sub(r"\b(0x)?[0-9a-f]{8,}\b|\d{4,}", "N", " ".join(str(message).split()))
    return f"{type(error).__name__}: {message[:60]}"


Submit = Callable[[Job], Iterable[str]]


def run_soak(plan: list[Job], submit_valid: Submit, submit_invalid: Submit, concurrency: int, time_limit: float, on_done: Callable[[Outcome], None] = lambda o: None) -> tuple[list[Outcome], float]:
    """Runs the plan's jobs on `concurrency` threads until done or until time_limit seconds have passed (then no new job starts).
    A submit callable returns the reply's text pieces; raising is a refusal. -> outcomes (plan order; jobs not started absent), wall time."""
    jobs, lock, outcomes, t0 = iter(plan), threading.Lock(), [], time.monotonic()

    def run_one(job: Job) -> Outcome:
        start, first, error = time.monotonic(), None, None
        try:
            for _ in (submit_valid if job.valid else submit_invalid)(job):
                first = first or time.monotonic()
        except Exception as e:  # noqa: BLE001 — every exception is an outcome to count
            error = error_class(e)
        return Outcome(job, start - t0, time.monotonic() - t0, None if first is None else first - t0, error)

    def worker() -> None:
        while True:
            with lock:
                if (job := next(jobs, None) if time.monotonic() - t0 < time_limit else None) is None:
                    return
            outcome = run_one(job)
            with lock:
                outcomes.append(outcome), on_done(outcome)

    workers = max(1, min(concurrency, len(plan)))
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(lambda _: worker(), range(workers)))
    return sorted(outcomes, key=lambda o: o.job.index), time.monotonic() - t0


def percentiles(values: list[float]) -> dict:
    p50, p90, p99 = np.percentile(values, [50, 90, 99]).tolist() if values else (None, None, None)
    return {"count": len(values), "p50": p50, "p90": p90, "p99": p99, "max": max(values, default=None)}


def summarize(config: dict, outcomes: list[Outcome], wall: float, rss: RssSampler | None, rss_t0: float, rss_slope_limit: float, bounded_by: str = "uss") -> dict:
    """The report: rss (stopped) has the samples; rss_t0 is the time.monotonic() of the soak's start."""
    valid, invalid = [o for o in outcomes if o.job.valid], [o for o in outcomes if not o.job.valid]
    ok, failed = [o for o in valid if o.error is None], Counter(o.error for o in valid if o.error)
    accepted = Counter(o.job.kind for o in invalid if o.error is None)
    by_kind = {kind: {"sent": sum(o.job.kind == kind for o in invalid), "unexpected_success": accepted[kind], "refused": dict(Counter(o.error for o in invalid if o.job.kind == kind and o.error))} for kind in sorted({o.job.kind for o in invalid})}
    total, shm = rss_summary(rss.samples if rss else [], rss_slope_limit, bounded_by, rss_t0), rss_summary(rss.shm if rss else [], rss_slope_limit)
    if total["rss_bounded"] is not None and shm["rss_bounded"] is not None:
        total["rss_bounded"] = total["rss_bounded"] and shm["rss_bounded"]
    return {
        "config": config, "wall_time_s": wall, "issued": len(outcomes), "not_issued": config["requests"] - len(outcomes),
        "counts": {
            "valid_ok": len(ok), "valid_failed": {"count": sum(failed.values()), "messages": dict(failed)}, "invalid_refused": dict(Counter(o.error for o in invalid if o.error)),
            "unexpected_success": {"count": sum(accepted.values()), "kinds": dict(accepted)},
        },
        "invalid_by_kind": by_kind,
        "latency_s": {"total": percentiles([o.end - o.start for o in ok]), "time_to_first_token": percentiles([o.first - o.start for o in ok if o.job.stream and o.first is not None])},
        "throughput": {"requests_per_s": len(outcomes) / wall, "valid_ok_per_s": len(ok) / wall},
        "memory": {  # samples: [time_s, rss, uss, pss] bytes; shm's [time_s, bytes]
            "bounded_by": bounded_by, "total": total,
            "processes": {k: rss_summary(v, rss_slope_limit, bounded_by, rss_t0) for k, v in (rss.processes if rss else {}).items()},
            "shm": {**shm, "samples": [[t - rss_t0, b] for t, b in (rss.shm if rss else [])]},
        },
        "requests": [{**asdict(o.job), "start": o.start, "end": o.end, "first": o.first, "error": o.error} for o in outcomes],
    }


def write_report(report: dict, out: Path) -> None:
    from matplotlib.figure import Figure  # Agg canvas: no display, no global backend switch

    out.mkdir(parents=True, exist_ok=True)
    (out / "soak.json").write_text(json.dumps(report, indent=2, ensure_ascii=False) + "\n")
    fig = Figure(figsize=(11, 8), layout="constrained")
    ax, per = fig.subplots(2, 1, sharex=True)
    memory, column = report["memory"], 1 + FIELDS.index(report["memory"]["bounded_by"])
    series = [(ax, memory["total"]["samples"], 1 + i, {"linestyle": (":", "--", "-")[i], "color": "tab:blue", "label": f"summed {f.upper()}"}) for i, f in enumerate(FIELDS)]
    series += [(per, p["samples"], column, {"label": label}) for label, p in memory["processes"].items()]  # each one's bounded_by
    for axes, samples, i, style in series + [(per, memory["shm"]["samples"], 1, {"color": "black", "linestyle": ":", "label": "/dev/shm regions"})]:
        axes.plot([s[0] for s in samples], [s[i] / MIB for s in samples], **style)
    marks = {"valid ok": (True, False, "tab:green"), "valid failed": (True, True, "tab:red"), "invalid refused": (False, True, "tab:gray"), "unexpected success": (False, False, "tab:orange")}
    for row, (label, (valid, failed, color)) in enumerate(marks.items()):
        ends = [r["end"] for r in report["requests"] if r["valid"] == valid and bool(r["error"]) == failed]
        if ends:  # ticks along the bottom (axes coordinates), one row per outcome
            ax.scatter(ends, [0.02 + 0.04 * row] * len(ends), marker="|", color=color, label=f"{label} ({len(ends)})", transform=ax.get_xaxis_transform())
    ax.set(ylabel="tracked processes (MiB)", title=f"soak: {report['config']['target']} {report['config']['url']}")
    per.set(xlabel="time since start (s)", ylabel=f"{memory['bounded_by'].upper()} of each process (MiB)")
    ax.legend(loc="best", fontsize="small"), per.legend(loc="best", fontsize="small")
    fig.savefig(out / "soak.png", dpi=100)


# Broken sampling values: the same in both targets (OpenAI has no top_k or repetition_penalty field: extra_body).
BAD_SAMPLING = {
    "temperature=-1": {"temperature": -1.0}, "top_p=1.5": {"top_p": 1.5}, "top_k=-1": {"top_k": -1},
    "repetition_penalty=0": {"repetition_penalty": 0.0}, "max_tokens=0": {"max_tokens": 0}, "max_tokens=10M": {"max_tokens": 10_000_000},
}  # fmt: skip


class TritonTarget:
    INVALID_KINDS = (*BAD_SAMPLING, "corrupt image", "more <image> tags than images", "max_tiles=0", "history not JSON", "empty image")

    def __init__(self, url: str, max_tokens: int, timeout: float):
        import tritonclient.grpc as grpcclient

        from client.triton_client import InternVLClient

        self.client, self.max_tokens = InternVLClient(url, timeout=timeout, check_sampling=False), max_tokens  # the server must refuse
        try:  # before the soak: a run against nothing would only count failures
            live = grpcclient.InferenceServerClient(self.client.url).is_server_live(client_timeout=10)
        except Exception as error:  # noqa: BLE001 — refused, unresolvable, not gRPC: nothing usable answers
            raise Unreachable(f"no Triton gRPC server answers at {url} ({type(error).__name__}); start one with `make serve`") from None
        if not live:
            raise Unreachable(f"Triton at {url} is not live yet")

    def valid(self, job: Job) -> Iterator[str]:
        return self._call(job.stream, TWO_IMAGES if job.kind == "2 images" else QUESTION, _images(job))

    def invalid(self, job: Job) -> Iterator[str]:
        image = _images(job, 1)
        if job.kind in BAD_SAMPLING:
            return self._call(job.stream, QUESTION, image, **BAD_SAMPLING[job.kind])
        question, images, kwargs = {
            "corrupt image": (QUESTION, [_corrupt(job.seed)], {}), "more <image> tags than images": (TWO_IMAGES, image, {}),
            "max_tiles=0": (QUESTION, image, {"max_tiles": 0}), "empty image": (QUESTION, [b""], {}),
            "history not JSON": (QUESTION, image, {"extra": {"history": ("BYTES", '[["Hi", ')}}),
        }[job.kind]  # fmt: skip
        return self._call(job.stream, question, images, **kwargs)

    def _call(self, stream: bool, question: str, images: list[bytes], **kwargs) -> Iterator[str]:
        kwargs = {"max_tokens": self.max_tokens, **kwargs}  # streamed: one piece per token
        yield from self.client.stream(question, images, keep_empty=True, **kwargs) if stream else [self.client.chat(question, images, **kwargs)]


class OpenAITarget:
    INVALID_KINDS = (*BAD_SAMPLING, "corrupt image", "bad base64", "empty image", "assistant before user", "n=2", "unknown model")

    def __init__(self, url: str, max_tokens: int, timeout: float, api_key: str | None = None):
        import openai

        url = url if "://" in url else f"http://{url}"  # host:port, as the Triton target takes it
        # No retries: a retried failure would hide in the latency instead of being counted.
        self.client = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=api_key or "none", timeout=timeout, max_retries=0)
        try:
            self.model, self.max_tokens = self.client.models.list().data[0].id, max_tokens
        except openai.APIConnectionError:
            raise Unreachable(f"no server answers at {url}; start the OpenAI server with `make serve` (port 9000)") from None
        except openai.AuthenticationError:
            raise Unreachable(f"{url} refused the API key (HTTP 401): pass the server's key with --api-key") from None
        except openai.APIStatusError as error:
            raise Unreachable(f"{url} answered GET /v1/models with HTTP {error.status_code}: not this project's OpenAI server ({error.message})") from None

    def valid(self, job: Job) -> Iterator[str]:
        return self._call(job.stream, [_user(QUESTION, _images(job))])

    def invalid(self, job: Job) -> Iterator[str]:
        user = _user(QUESTION, _images(job, 1))
        if job.kind in BAD_SAMPLING:
            return self._call(job.stream, [user], **({"extra_body": bad} if {"top_k", "repetition_penalty"} & (bad := BAD_SAMPLING[job.kind]).keys() else bad))
        messages, kwargs = {
            "corrupt image": ([_user(QUESTION, [_corrupt(job.seed)])], {}), "empty image": ([_user(QUESTION, [b""])], {}),
            "bad base64": ([_user(QUESTION, ["data:image/jpeg;base64,@@not*base64@@"])], {}),
            "assistant before user": ([{"role": "assistant", "content": "Hello."}, user, {"role": "user", "content": "And?"}], {}),
            "n=2": ([user], {"n": 2}), "unknown model": ([user], {"model": "no-such-model"}),
        }[job.kind]  # fmt: skip
        return self._call(job.stream, messages, **kwargs)

    def _call(self, stream: bool, messages: list[dict], **kwargs) -> Iterator[str]:
        kwargs = {"model": self.model, "max_tokens": self.max_tokens, **kwargs}
        reply = self.client.chat.completions.create(messages=messages, stream=stream, **kwargs)
        if not stream:
            yield reply.choices[0].message.content or ""
            return
        # the first chunk carries the role only
        yield from (text for chunk in reply if (text := chunk.choices[0].delta.content if chunk.choices else None))


def _images(job: Job, count: int | None = None) -> list[bytes]:
    """`count` seeded images of varied sizes and formats; by default as many as the job's kind says."""
    rng = random.Random(job.seed)
    count = count if count is not None else int(job.kind[0]) if job.kind[0].isdigit() else 0
    return [synthetic_image(job.seed + i, *rng.choice(IMAGE_SIZES), rng.choice(IMAGE_FORMATS)) for i in range(count)]


def _corrupt(seed: int) -> bytes:
    """Random bytes behind a JPEG signature: claims to be an image, decodes as none."""
    return b"\xff\xd8\xff\xe0" + random.Random(seed).randbytes(4096)


def _user(text: str, images: list[bytes | str]) -> dict:
    """A user message; an image is bytes (sent as a base64 data URI) or a URI string as it is."""
    mime = {b"\x89PNG": "png", b"RIFF": "webp"}
    urls = [i if isinstance(i, str) else f"data:image/{mime.get(i[:4], 'jpeg')};base64,{base64.b64encode(i).decode('ascii')}" for i in images]
    return {"role": "user", "content": [{"type": "text", "text": text}] + [{"type": "image_url", "image_url": {"url": u}} for u in urls]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.soak", description=__doc__.split("\n")[0], formatter_class=HelpFormatter)
    p.add_argument("--target", choices=("triton", "openai"), default="triton", help="the server's protocol")
    p.add_argument("--url", help="server address (default: 127.0.0.1:8001 for triton, http://127.0.0.1:9000 for openai)")
    p.add_argument("--api-key", help="--target openai: the key of a server started with --api-key / INTERNVL_API_KEY (default: none)")
    p.add_argument("--requests", type=int, default=300, help="requests to send")
    p.add_argument("--warmup", type=int, default=0, help="requests of the same mix sent first, outside the measurement (default: 0)")
    p.add_argument("--concurrency", type=int, default=8, help="requests in flight at once")
    p.add_argument("--invalid-fraction", type=float, default=0.2, help="share of requests that must be refused")
    p.add_argument("--max-tokens", type=int, default=16, help="max_tokens of the valid requests")
    p.add_argument("--stream-fraction", type=float, default=0.5, help="share of requests that stream")
    p.add_argument("--seed", type=int, default=0, help="seed of the request mix and images")
    p.add_argument("--time-limit", type=float, default=600, help="seconds after which no new request starts")
    p.add_argument("--request-timeout", type=float, default=300, help="seconds one request may take")
    p.add_argument("--pid", type=int, action="append", help="a process to track with its children, repeatable (default: the one listening on the URL's port, and for openai also the tritonserver it calls)")
    p.add_argument("--rss-interval", type=float, default=0.5, help="seconds between memory samples")
    p.add_argument("--rss-slope-limit", type=float, default=5.0, help="MiB/min of growth over the last half below which memory counts as bounded")
    p.add_argument("--bounded-by", choices=FIELDS, default="uss", help="the summed memory that decides rss_bounded with the shm bytes (default: uss; RSS counts shared pages once per process)")
    p.add_argument("--out", type=Path, default=Path("soak"), help="directory for soak.json and soak.png")
    args = p.parse_args(argv)
    args.url = args.url or ("127.0.0.1:8001" if args.target == "triton" else "http://127.0.0.1:9000")
    return args


def summary_text(report: dict) -> str:
    counts, latency, memory = report["counts"], report["latency_s"]["total"], report["memory"]
    mib = lambda v, sign="": "-" if v is None else f"{v:{sign}.0f}"  # noqa: E731
    lines = [f"  {name}: " + ", ".join(f"{f.upper()} {mib(m[f]['start_mib'])}→{mib(m[f]['end_mib'])} (max {mib(m[f]['max_mib'])})" for f in FIELDS) + f"; floor, last half {mib(m['slope_mib_per_min'], '+')} MiB/min"
             for name, m in {"summed": memory["total"], **memory["processes"]}.items()]  # fmt: skip
    return "\n".join([
        f"{report['issued']} requests in {report['wall_time_s']:.1f} s ({report['not_issued']} not issued: time limit)",
        *([f"warmup: {report['warmup']['issued']} requests, {report['warmup']['valid_failed']['count']} valid ones failed"] if report.get("warmup", {}).get("issued") else []),
        f"valid: {counts['valid_ok']} ok, {counts['valid_failed']['count']} failed",
        *(f"  FAILED ×{n}: {message}" for message, n in counts["valid_failed"]["messages"].items()),
        f"invalid: {sum(counts['invalid_refused'].values())} refused, {counts['unexpected_success']['count']} unexpected successes",
        *(f"  ACCEPTED ×{n}: {kind}" for kind, n in counts["unexpected_success"]["kinds"].items()),
        "latency (s): " + ", ".join(f"{k} {v:.3f}" for k, v in latency.items() if k != "count" and v is not None),
        f"memory (MiB, slopes of {memory['bounded_by'].upper()}): rss_bounded {memory['total']['rss_bounded']}", *lines,
        f"  /dev/shm regions: {mib(memory['shm']['start_mib'])}→{mib(memory['shm']['end_mib'])} (max {mib(memory['shm']['max_mib'])})",
    ])  # fmt: skip


class Unreachable(ConnectionError):
    """The target does not answer as the server it should be: the soak does not start."""


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.target == "triton":
            target = TritonTarget(args.url, args.max_tokens, args.request_timeout)
        else:
            target = OpenAITarget(args.url, args.max_tokens, args.request_timeout, args.api_key)
    except (Unreachable, ValueError) as error:  # ValueError: a malformed --url
        print(f"error: {error}", file=sys.stderr)
        return 2
    plan, pids = make_plan(args.requests, args.invalid_fraction, args.stream_fraction, args.seed, target.INVALID_KINDS), args.pid or default_pids(args.target, args.url)
    if not pids:
        print(f"note: no process listens on {args.url}'s port here (a remote server?): memory is not tracked; --pid names one", file=sys.stderr)
    config = {**vars(args), "out": str(args.out), "pid": pids}
    warmup = make_plan(args.warmup, args.invalid_fraction, args.stream_fraction, args.seed + 1, target.INVALID_KINDS)
    with tqdm(total=len(warmup), unit="req", desc="warmup", disable=not warmup) as progress:
        warm, _ = run_soak(warmup, target.valid, target.invalid, args.concurrency, args.time_limit, lambda outcome: progress.update())
    warm_failed = Counter(o.error for o in warm if o.job.valid and o.error)
    progress = tqdm(total=len(plan), unit="req", desc="soak")
    sampler, t0 = RssSampler(pids, args.rss_interval).start() if pids else None, time.monotonic()
    outcomes, wall = run_soak(plan, target.valid, target.invalid, args.concurrency, args.time_limit, lambda outcome: progress.update())
    progress.close()
    if sampler:
        sampler.stop()
    report = summarize(config, outcomes, wall, sampler, t0, args.rss_slope_limit, args.bounded_by)
    report["warmup"] = {"issued": len(warm), "valid_failed": {"count": sum(warm_failed.values()), "messages": dict(warm_failed)}}
    write_report(report, args.out)
    print(summary_text(report) + f"\nreport: {args.out / 'soak.json'}, {args.out / 'soak.png'}")
    return 1 if report["counts"]["valid_failed"]["count"] or warm_failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
