"""Chat with a served InternVL model from the command line.

    python -m client.chat --url 127.0.0.1:8001 --image a.jpg --image b.png "Compare the images."
    python -m client.chat --http --url 127.0.0.1:8000 --no-stream "Hello"
    python -m client.chat --history chat.json --image a.jpg "And the colours?"   # reads, extends chat.json
    python -m client.chat --interactive --image a.jpg                 # a conversation on stdin

Replies stream to stdout (gRPC bidirectional streaming, or HTTP generate_stream with --http).
`<image>` tags in the question place the images; a first question without tags gets one
`<image>\\n` per image in front (as the model cards' scripts do). With images and history, send the
same images on every turn: the first turn's `<image>` tags stay in the history, as with the model
cards' model.chat. Sampling values are checked with the server's rules before anything is sent.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

from client.triton_client import InternVLClient, NotTriton, Request, SamplingParamError, ServerError, ServerUnavailable


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m client.chat", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__.split("\n", 2)[2])
    p.add_argument("question", nargs="?", help="the question (omit with --interactive)")
    p.add_argument("--url", help="server address (default 127.0.0.1:8001 gRPC, 127.0.0.1:8000 HTTP)")
    p.add_argument("--http", action="store_true", help="use HTTP generate / generate_stream instead of gRPC")
    p.add_argument("--model", default="internvl", help="Triton model to ask: the ensemble's name (default: %(default)s)")
    p.add_argument("--image", action="append", default=[], type=Path, help="image file (repeatable)")
    p.add_argument("--no-stream", action="store_true", help="one response with the whole reply")
    p.add_argument(
        "--max-tokens", type=int, default=512,
        help="most tokens to generate (default: %(default)s; the servers' own default is the rest of the context)",
    )  # fmt: skip
    p.add_argument("--temperature", type=float, help="≥ 0; 0 or absent: greedy")
    p.add_argument("--top-p", type=float, help="in [0, 1]; 0 or absent: off")
    p.add_argument("--top-k", type=int, help="≥ 0; 0 or absent: off")
    p.add_argument("--repetition-penalty", type=float, help="in [0.001, 1000]; 1 or absent: off")
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--max-tiles", type=int, help="tiles per image (the cards' max_num)")
    p.add_argument("--system-prompt", help="replace the model's system message")
    p.add_argument("--history", type=Path, help="JSON file of [user, assistant] turns; extended with this turn")
    p.add_argument("--interactive", action="store_true", help="read questions from stdin until EOF")
    args = p.parse_args(argv)
    if not args.interactive and not args.question:
        p.error("a question is required (or --interactive)")
    args.url = args.url or ("127.0.0.1:8000" if args.http else "127.0.0.1:8001")
    return args


def ask(client: InternVLClient, question: str, images: list[bytes], history, args) -> str:
    kwargs = dict(
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop=args.stop,
        max_tiles=args.max_tiles,
        history=history,
        system_prompt=args.system_prompt,
    )
    if args.no_stream:
        reply = client.chat(question, images, **kwargs)
        print(reply, flush=True)
        return reply
    parts = []
    try:
        for delta in client.stream(question, images, **kwargs):
            parts.append(delta)
            print(delta, end="", flush=True)
    except BaseException:
        if parts:  # a partial reply ends its line: the error gets a line of its own
            print(flush=True)
        raise
    print(flush=True)
    return "".join(parts)


def effective_question(question: str, images: list, history) -> str:
    """The question as the server records it in the history (engine/prompt.py): on a first turn with
    images and no `<image>` tag, one `<image>\\n` per image in front (model.chat's one tag for one
    image; the cards' multi-image scripts, e.g. Skywork-R1V3's, prepend "<image>\\n" * len(images))."""
    if history is None and images and "<image>" not in question:
        return "<image>\n" * len(images) + question
    return question


def name_images(message: str, paths: list[Path]) -> str:
    """The server counts images from 0 ("image 1: cannot decode image: ..."); say which file it was."""

    def name(match: re.Match) -> str:
        i = int(match[1])
        return f"{paths[i]}: " if i < len(paths) else match[0]

    return re.sub(r"\bimage (\d+): ", name, message)


def main(argv=None) -> int:
    args = parse_args(argv)
    protocol = "http" if args.http else "grpc"
    try:
        client = InternVLClient(args.url, protocol, args.model)
    except ValueError as e:  # the URL's form
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:  # the server's rules, checked before anything is read or sent
        Request("", max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed).check()
    except SamplingParamError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        images = []
        for path in args.image:
            try:
                images.append(path.read_bytes())
            except OSError as e:
                print(f"error: cannot read image {path}: {e.strerror or e}", file=sys.stderr)
                return 1
        history = None
        if args.history and args.history.is_file():
            try:
                history = json.loads(args.history.read_text(encoding="utf-8"))
            except ValueError as e:
                print(f"error: --history {args.history} is not JSON [[user, assistant], ...]: {e}", file=sys.stderr)
                return 1
        questions = iter(lambda: input("> "), None) if args.interactive else iter([args.question])
        for question in questions:
            reply = ask(client, question, images, history, args)
            history = [*(history or []), [effective_question(question, images, history), reply]]
            if args.history:
                args.history.write_text(json.dumps(history, ensure_ascii=False, indent=1), encoding="utf-8")
    except EOFError:
        return 0
    except NotTriton as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except ServerUnavailable as e:
        other = "--http for the HTTP port" if protocol == "grpc" else "without --http for the gRPC port"
        print(f"error: {e} (start one with `make serve`, or pass --url; {other})", file=sys.stderr)
        return 1
    except ServerError as e:
        print(f"error from server: {name_images(str(e), args.image)}", file=sys.stderr)
        return 1
    except OSError as e:  # writing --history
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
