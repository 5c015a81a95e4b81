#!/usr/bin/env bash
# GPU check: build a tiny federation of its own (three generated sources), train a small profile
# (public model + 2 experts) on the device, merge, trace; print training tokens/s and trace latency
# on the device against the CPU. Under 8 minutes on one GPU machine (demo profile); about a minute
# on 2 cores with --device cpu (tiny profile: how tests/test_gpu_check.py runs it).
#
#   bash bench/gpu_check.sh                          # --device auto: the GPU when there is one
#   bash bench/gpu_check.sh --device cuda --dtype bfloat16 --profile demo
#   bash bench/gpu_check.sh --device cpu             # CPU only (no comparison column)
#
# Options:
#   --device auto|cuda|cpu   where to train and trace (default auto)
#   --dtype float32|bfloat16 default: bfloat16 on a GPU, float32 on the CPU
#   --profile NAME           default: demo on a GPU, tiny on the CPU
#   --cpu-steps N            steps of the CPU comparison runs (default 20; tokens/s needs no full run)
#   --workspace DIR          build there and keep it (default: a temporary folder, removed at the end)
# Environment: FLEXOLMO, the command (default `flexolmo`, e.g. ".venv/bin/python -m cli.main");
#              PYTHON, for the corpora and reading the cards (default python3).
#
# Figures are the CLI's own: tokens/s from each card the training wrote (models/public/card.json,
# experts/<source>/card.json; training time only), trace latency from `flexolmo trace --json`'s
# timings_ms (in-process, one trace per process: on a GPU its first passes include CUDA warm-up),
# wall time from `date +%s.%N` around each command (process start and model load included).
set -euo pipefail

DEVICE=auto DTYPE="" PROFILE="" CPU_STEPS=20 WS=""
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --dtype) DTYPE="$2"; shift 2 ;;
    --profile) PROFILE="$2"; shift 2 ;;
    --cpu-steps) CPU_STEPS="$2"; shift 2 ;;
    --workspace) WS="$2"; shift 2 ;;
    -h|--help) sed -n '2,26p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done
PYTHON=${PYTHON:-python3}
read -r -a FLEX <<< "${FLEXOLMO:-flexolmo}"

case "$DEVICE" in
  auto) DEVICE=$("$PYTHON" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")') ;;
  cuda*) "$PYTHON" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || {
           echo "gpu_check: --device $DEVICE: no CUDA GPU is visible to torch here (use --device cpu or auto)" >&2; exit 1; } ;;
  cpu) ;;
  *) echo "gpu_check: --device $DEVICE is not a device; use auto, cuda (cuda:N) or cpu" >&2; exit 2 ;;
esac
ON_GPU=0; [ "$DEVICE" != cpu ] && ON_GPU=1
[ -n "$DTYPE" ] || { [ $ON_GPU = 1 ] && DTYPE=bfloat16 || DTYPE=float32; }
[ -n "$PROFILE" ] || { [ $ON_GPU = 1 ] && PROFILE=demo || PROFILE=tiny; }
SCRATCH=$(mktemp -d)  # the generated corpora, the CPU comparison's workspace, and WS unless given
trap 'rm -rf "$SCRATCH"' EXIT
[ -n "$WS" ] || WS="$SCRATCH/ws"
mkdir -p "$WS" "$SCRATCH/input"
IN="$SCRATCH/input"
T_START=$(date +%s.%N)

now() { date +%s.%N; }
secs() { "$PYTHON" -c "import sys; print(f'{float(sys.argv[2]) - float(sys.argv[1]):.1f}')" "$1" "$2"; }
flex() { "${FLEX[@]}" -w "$1" "${@:2}"; }
quiet() {  # a command whose output (progress bars) is shown only when it fails
  "$@" > "$SCRATCH/log" 2>&1 || { local rc=$?; tail -n 20 "$SCRATCH/log" >&2; echo "gpu_check: failed: $*" >&2; exit $rc; }
}
card() { "$PYTHON" -c "import json, sys; print(json.load(open(sys.argv[1]))[sys.argv[2]])" "$1" "$2"; }

echo "gpu_check: profile $PROFILE, device $DEVICE, dtype $DTYPE, workspace $WS"

# -- a federation of its own: public prose, news prose, code (as tests/textcorpus.py makes them)
"$PYTHON" - "$IN" <<'EOF'
import json, random, sys
out = sys.argv[1]
common = "the of and to in is was for on with as by at from".split()
def prose(name, n, seed):
    rng, own = random.Random(seed), [f"{name}{i}" for i in range(400)]
    w = [1 / (r + 1) for r in range(400)]
    for i in range(n):
        sents = [" ".join(rng.choice(common) if rng.random() < 0.35 else rng.choices(own, w)[0]
                          for _ in range(rng.randint(6, 16))).capitalize() + "." for _ in range(rng.randint(4, 12))]
        yield {"doc_id": f"{name}-{i}", "text": " ".join(sents)}
def code(n, seed):
    rng, names = random.Random(seed), [f"var{i}" for i in range(80)]
    for i in range(n):
        lines = []
        for f in range(rng.randint(2, 5)):
            a, b = rng.sample(names, 2)
            lines.append(f"def fn{i}_{f}({a}, {b}):")
            lines += [rng.choice([f"    {a} = {b} + 1", f"    if {a}:", f"        return {b}", f"    print({a}, {b})"])
                      for _ in range(rng.randint(2, 6))] + [""]
        yield {"doc_id": f"code-{i}", "text": "\n".join(lines)}
for name, docs in (("public", prose("pub", 400, 1)), ("news", prose("news", 300, 2)), ("code", code(300, 3))):
    with open(f"{out}/{name}.jsonl", "w") as f:
        f.writelines(json.dumps(d) + "\n" for d in docs)
EOF
for s in public news code; do
  quiet flex "$WS" sources add "$s" --owner "$s-owner" --domain "$s" --licence CC0 --path "$IN/$s.jsonl"
done
quiet flex "$WS" tokenizer train --vocab-size 1024
quiet flex "$WS" index build --all
TEXT=$("$PYTHON" -c "import json, sys; print(' '.join(json.loads(open(sys.argv[1]).readline())['text'].split()[:60]))" "$IN/public.jsonl")
if [ $ON_GPU = 1 ]; then  # the CPU comparison trains in a copy (the same sources, tokenizer and indexes)
  CPU_WS="$SCRATCH/ws-cpu"; cp -r "$WS" "$CPU_WS"
fi

# -- train on the device, merge
declare -A TOK_S WALL
t0=$(now); quiet flex "$WS" train public --profile "$PROFILE" --device "$DEVICE" --dtype "$DTYPE"
WALL[public]=$(secs "$t0" "$(now)"); TOK_S[public]=$(card "$WS/models/public/card.json" tokens_per_s)
for s in news code; do
  t0=$(now); quiet flex "$WS" train expert --source "$s" --profile "$PROFILE" --device "$DEVICE" --dtype "$DTYPE"
  WALL[$s]=$(secs "$t0" "$(now)"); TOK_S[$s]=$(card "$WS/experts/$s/card.json" tokens_per_s)
done
quiet flex "$WS" merge --experts news,code

# -- trace on the device (and, below, on the CPU: same workspace, same text)
trace_ms() {  # workspace, device options...: "<timings_ms.total> <timings_ms.experts> <wall s>"
  local t0 json; t0=$(now)
  json=$(flex "$1" trace --text "$TEXT" --json "${@:2}" 2> "$SCRATCH/log") || { tail -n 20 "$SCRATCH/log" >&2; exit 1; }
  echo "$("$PYTHON" -c "import json, sys; t = json.loads(sys.stdin.read())['timings_ms']; print(t['total'], t.get('experts', 0))" <<< "$json") $(secs "$t0" "$(now)")"
}
read -r TR_TOTAL TR_EXPERTS TR_WALL <<< "$(trace_ms "$WS" --device "$DEVICE" --dtype "$DTYPE")"

# -- the CPU comparison
if [ $ON_GPU = 1 ]; then
  quiet flex "$CPU_WS" train public --profile "$PROFILE" --device cpu --steps "$CPU_STEPS"
  CPU_PUBLIC=$(card "$CPU_WS/models/public/card.json" tokens_per_s)
  quiet flex "$CPU_WS" train expert --source news --profile "$PROFILE" --device cpu --steps "$CPU_STEPS"
  CPU_NEWS=$(card "$CPU_WS/experts/news/card.json" tokens_per_s)
  read -r C_TOTAL C_EXPERTS C_WALL <<< "$(trace_ms "$WS" --device cpu --dtype float32)"
fi

# -- report
ratio() { "$PYTHON" -c "import sys; a, b = map(float, sys.argv[1:]); print(f'{a / b:.1f}x' if b else '-')" "$1" "$2"; }
row() { printf "%-30s %14s %14s %8s\n" "$@"; }
echo
if [ $ON_GPU = 1 ]; then
  echo "gpu_check: $PROFILE profile; $DEVICE in $DTYPE against cpu in float32 ($CPU_STEPS steps)"
  row "" "$DEVICE" "cpu" "ratio"
  row "train public, tokens/s" "${TOK_S[public]}" "$CPU_PUBLIC" "$(ratio "${TOK_S[public]}" "$CPU_PUBLIC")"
  row "train expert news, tokens/s" "${TOK_S[news]}" "$CPU_NEWS" "$(ratio "${TOK_S[news]}" "$CPU_NEWS")"
  row "train expert code, tokens/s" "${TOK_S[code]}" "-" ""
  row "trace, ms (in-process)" "$TR_TOTAL" "$C_TOTAL" "$(ratio "$C_TOTAL" "$TR_TOTAL")"
  row "  of which experts, ms" "$TR_EXPERTS" "$C_EXPERTS" "$(ratio "$C_EXPERTS" "$TR_EXPERTS")"
  row "trace command, s (wall)" "$TR_WALL" "$C_WALL" ""
else
  echo "gpu_check: $PROFILE profile; cpu in $DTYPE (no GPU comparison: --device cpu; on a GPU machine use --device cuda)"
  row "" "cpu" "" ""
  row "train public, tokens/s" "${TOK_S[public]}" "" ""
  row "train expert news, tokens/s" "${TOK_S[news]}" "" ""
  row "train expert code, tokens/s" "${TOK_S[code]}" "" ""
  row "trace, ms (in-process)" "$TR_TOTAL" "" ""
  row "  of which experts, ms" "$TR_EXPERTS" "" ""
  row "trace command, s (wall)" "$TR_WALL" "" ""
fi
echo "wall time per training command, s: public ${WALL[public]}, news ${WALL[news]}, code ${WALL[code]}"
echo "gpu_check: done in $(secs "$T_START" "$(now)") s"
