"""Multi-turn chat: our per-device prompt cache against llama-server's prompt cache.

Two conversations, interleaved turn by turn (A1 B1 A2 B2 ... A8 B8), each a system prompt and 8
user turns of about 90 tokens; every turn resends the whole history with the server's own
previous (greedy, 32-token) answers, as chat apps do. Ours gets each conversation's cache key in
``X-LLMRouter-Cache-Key`` (the router sends one per device); llama-server runs as shipped (its
slots keep their KV cache and a request goes to the slot sharing the longest prefix; the
host-memory prompt cache on). Same model, threads and slots (4) on both. Each round starts two
fresh conversations (a different system prompt per round, so no round reuses another's) and
the servers alternate which goes first. Prints medians over the rounds of the time to first
token at the first and at the last turn, and the ratios the issue asks for:

  ours last turn / llama-server last turn (target <= 1.0)
  ours last turn / ours first turn        (target <= 1.5)

    .venv/bin/python bench/multiturn_cache.py [--rounds 5] [--threads 2]
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from inference_vs_llama_server import Server, print_builds, server_arguments, start_both

TURNS = 8
REPLY_TOKENS = 32
SENTENCES = [
    "I am planning a long trip through the mountains next summer with two friends",
    "we want to walk about fifteen kilometres a day and sleep in small huts along the way",
    "one of us has never carried a heavy backpack for more than a single afternoon",
    "the weather in the high valleys can change quickly and the nights are often cold",
    "we are not sure how much food and water to carry between the places where we can shop",
    "I would also like to take good photographs without bringing too much equipment",
    "our budget is modest, so we would rather spend money on boots than on hotels",
    "the route crosses two passes above two thousand metres that may still have snow",
    "my phone battery never lasts a full day when the map application is running",
    "we have read different advice about maps, compasses and satellite messengers",
]


def user_turn(conversation: str, turn: int) -> str:
    """About 90 tokens of plain English, different for every conversation and turn."""
    parts = [SENTENCES[(turn * 3 + i) % len(SENTENCES)] for i in range(4)]
    return (
        f"Question {turn + 1} from {conversation}: "
        + ". Also, ".join(parts)
        + ". What would you suggest for this part of the plan, in a few words?"
    )


def system_prompt(round_: int) -> str:
    return (
        f"Session {round_}. You are a careful, friendly travel assistant. Answer briefly and "
        "concretely, one or two sentences, and never invent facts about places."
    )


def turn(
    server: Server, messages: list[dict[str, str]], key: str | None
) -> tuple[float, str, dict[str, int]]:
    """One streamed chat turn: (time to first token, the answer, prompt and cached tokens)."""
    body = {
        "messages": messages,
        "max_tokens": REPLY_TOKENS,
        "temperature": 0.0,
        "stream": True,
        **server.extra,
    }
    headers = {"content-type": "application/json"}
    if key is not None:
        headers["X-LLMRouter-Cache-Key"] = key
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=300)
    started = time.perf_counter()
    conn.request("POST", "/v1/chat/completions", json.dumps(body), headers)
    response = conn.getresponse()
    if response.status != 200:
        raise SystemExit(f"{server.name}: HTTP {response.status} {response.read()[:200]!r}")
    first = None
    answer = []
    usage = {"prompt": 0, "cached": 0}
    for raw in response:
        line = raw.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        chunk = json.loads(line[6:])
        if chunk.get("usage"):
            usage["prompt"] = chunk["usage"].get("prompt_tokens", 0)
            details = chunk["usage"].get("prompt_tokens_details") or {}
            usage["cached"] = details.get("cached_tokens", 0)
        if "timings" in chunk:  # llama-server's own count of reused tokens
            usage["cached"] = chunk["timings"].get("cache_n", usage["cached"])
        for choice in chunk.get("choices") or []:
            text = (choice.get("delta") or {}).get("content")
            if text:
                first = first or time.perf_counter()
                answer.append(text)
    conn.close()
    assert first is not None, f"{server.name} produced no text"
    return first - started, "".join(answer), usage


def conversation_pair(
    server: Server, round_: int, keyed: bool
) -> tuple[float, float, dict[str, int]]:
    """Both conversations, interleaved: the time to first token of the first and of the last
    turn (each the mean of the two conversations), and conversation B's last prompt size and
    reused tokens."""
    histories = {
        name: [{"role": "system", "content": system_prompt(round_)}] for name in ("A", "B")
    }
    keys = {name: f"bench-round{round_}-conversation-{name}" if keyed else None for name in "AB"}
    ttft: dict[str, list[float]] = {"A": [], "B": []}
    usage: dict[str, int] = {}
    for t in range(TURNS):
        for name in ("A", "B"):
            history = histories[name]
            history.append({"role": "user", "content": user_turn(name, t)})
            seconds, answer, usage = turn(server, history, keys[name])
            history.append({"role": "assistant", "content": answer})
            ttft[name].append(seconds)
    first = statistics.mean(ttft[n][0] for n in "AB")
    last = statistics.mean(ttft[n][-1] for n in "AB")
    return first, last, usage


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    server_arguments(parser, ctx=4096)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    model, logs, servers = start_both(args, 4, "multiturn", prompt_cache=True)
    figures: dict[str, dict[str, list[float]]] = {
        s.name: {"first": [], "last": [], "prompt": [], "cached": []} for s in servers
    }
    try:
        for s in servers:
            s.wait_ready()
        print_builds(args, logs)
        for s in servers:  # warm-up
            turn(s, [{"role": "user", "content": "Hello."}], None)
        for round_ in range(args.rounds):
            order = servers if round_ % 2 == 0 else servers[::-1]
            for s in order:
                first, last, usage = conversation_pair(s, round_, keyed=s.name == "ours")
                figures[s.name]["first"].append(first)
                figures[s.name]["last"].append(last)
                figures[s.name]["prompt"].append(usage["prompt"])
                figures[s.name]["cached"].append(usage["cached"])
            print(f"round {round_ + 1}/{args.rounds} done", file=sys.stderr)
    finally:
        for s in servers:
            s.stop()
    ours, theirs = figures["ours"], figures["llama-server"]
    print(
        f"model {model.name}, threads {args.threads}, 2 interleaved conversations x {TURNS}"
        f" turns, {args.rounds} rounds (medians), KV {'unified' if args.kv_unified else 'per slot'}"
    )
    for s in servers:
        prompt, cached = figures[s.name]["prompt"], figures[s.name]["cached"]
        print(
            f"{s.name}: last prompt {statistics.median(prompt):.0f} tokens, reused per round "
            + " ".join(f"{int(c)}" for c in cached)
        )
    print(f"{'time to first token':<28}{'ours':>10}{'llama-server':>14}   per-round (ours, theirs)")
    for label, key in (("first turn (s)", "first"), ("last turn (s)", "last")):
        a, b = statistics.median(ours[key]), statistics.median(theirs[key])
        rounds = " ".join(f"{x:.3f}/{y:.3f}" for x, y in zip(ours[key], theirs[key], strict=True))
        print(f"{label:<28}{a:>10.3f}{b:>14.3f}   {rounds}")
    last_ratio = statistics.median(ours["last"]) / statistics.median(theirs["last"])
    growth = statistics.median(ours["last"]) / statistics.median(ours["first"])
    per_round = " ".join(f"{x / y:.2f}" for x, y in zip(ours["last"], theirs["last"], strict=True))
    print(f"ours last / llama-server last: {last_ratio:.3f} (target <= 1.0; per round {per_round})")
    print(f"ours last / ours first:        {growth:.3f} (target <= 1.5)")
    print(f"(server logs in {logs})")


if __name__ == "__main__":
    main()
