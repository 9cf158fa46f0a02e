"""xgrammar vs llguidance, the two grammar libraries considered for structured output: time to build
the vocabulary index, compile time per constraint, median per-token mask fill on CPU while walking a
valid answer, and schema coverage (enum, integer bounds, nested object, array, optional fields, string
pattern and format, regex, choices). Why engine/grammar.py uses xgrammar.

llguidance is not a dependency: `pip install llguidance` (or put it on PYTHONPATH) to run this.

    python bench/grammar_library_compare.py TOKENIZER_JSON EOS_TOKEN
    (e.g. the 32k-token tokenizer bench/structured_overhead.py trains:
     /tmp/batchllm-bench-structured-model/tokenizer.json '<|eos|>')
"""
import json, sys, time, statistics
import torch, xgrammar as xgr, llguidance as llg, llguidance.hf, llguidance.torch as llgt
from transformers import PreTrainedTokenizerFast
import tokenizers

path = sys.argv[1]
hf = PreTrainedTokenizerFast(tokenizer_object=tokenizers.Tokenizer.from_file(path))
eos = hf.convert_tokens_to_ids(sys.argv[2]) if len(sys.argv) > 2 else 0
V = len(hf)

SCHEMAS = {
 "enum": {"type": "object", "properties": {"label": {"enum": ["positive", "negative", "neutral"]}}, "required": ["label"]},
 "int_bounds": {"type": "object", "properties": {"age": {"type": "integer", "minimum": 0, "maximum": 120}}, "required": ["age"]},
 "nested": {"type": "object", "properties": {"p": {"type": "object", "properties": {"name": {"type": "string"}, "x": {"type": "number"}}, "required": ["name", "x"]}}, "required": ["p"]},
 "array": {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"}, "maxItems": 3}}, "required": ["tags"]},
 "optional": {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "boolean"}}, "required": ["a"]},
 "string_pattern": {"type": "object", "properties": {"zip": {"type": "string", "pattern": "^[0-9]{5}$"}}, "required": ["zip"]},
 "string_format": {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]},
}
REGEX = r"[A-Z]{3}-[0-9]{2,4}"
CHOICES = ["positive", "negative", "neutral"]

def xg_all():
    t0 = time.perf_counter(); info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=V, stop_token_ids=[eos]); t_info = time.perf_counter() - t0
    comp = xgr.GrammarCompiler(info, cache_enabled=False)
    out = {"tokenizer_info_s": t_info, "compile_ms": {}, "coverage": {}}
    grams = {}
    for name, s in SCHEMAS.items():
        try:
            t0 = time.perf_counter(); g = comp.compile_json_schema(json.dumps(s), any_whitespace=False); out["compile_ms"][name] = 1e3 * (time.perf_counter() - t0); grams[name] = g; out["coverage"][name] = True
        except Exception as e:
            out["coverage"][name] = f"error: {str(e)[:80]}"
    t0 = time.perf_counter(); grams["regex"] = comp.compile_regex(REGEX); out["compile_ms"]["regex"] = 1e3 * (time.perf_counter() - t0)
    ebnf = "root ::= " + " | ".join(json.dumps(c) for c in CHOICES)
    t0 = time.perf_counter(); grams["choices"] = comp.compile_grammar(ebnf); out["compile_ms"]["choices"] = 1e3 * (time.perf_counter() - t0)
    return info, grams, out

def llg_all():
    t0 = time.perf_counter(); tok = llguidance.hf.from_tokenizer(hf, n_vocab=V, eos_token=eos); t_info = time.perf_counter() - t0
    out = {"tokenizer_info_s": t_info, "compile_ms": {}, "coverage": {}}
    grams = {}
    for name, s in SCHEMAS.items():
        g = llg.LLMatcher.grammar_from_json_schema(json.dumps(s), defaults={"whitespace_flexible": False})
        t0 = time.perf_counter(); m = llg.LLMatcher(tok, g, log_level=0); dt = time.perf_counter() - t0
        out["coverage"][name] = True if not m.is_error() else f"error: {m.get_error()[:80]}"
        out["compile_ms"][name] = 1e3 * dt; grams[name] = g
    for name, g in (("regex", llg.LLMatcher.grammar_from_regex(REGEX)), ("choices", llg.LLMatcher.grammar_from_lark("start: " + " | ".join(json.dumps(c) for c in CHOICES)))):
        t0 = time.perf_counter(); m = llg.LLMatcher(tok, g, log_level=0); out["compile_ms"][name] = 1e3 * (time.perf_counter() - t0); grams[name] = g
        assert not m.is_error(), m.get_error()
    return tok, grams, out

# per-token mask cost: walk a valid answer, timing fill per token
ANSWERS = {"nested": '{"p": {"name": "abc def ghi", "x": 3.25}}', "array": '{"tags": ["one", "two", "three"]}', "regex": "ABC-1234", "choices": "negative"}

def xg_mask(info, grams):
    res = {}
    for name, text in ANSWERS.items():
        ids = hf.encode(text, add_special_tokens=False)
        m = xgr.GrammarMatcher(grams[name]); bm = xgr.allocate_token_bitmask(1, V); ts = []
        for t in ids:
            t0 = time.perf_counter(); m.fill_next_token_bitmask(bm); ts.append(time.perf_counter() - t0)
            if not m.accept_token(t): break
        res[name] = 1e6 * statistics.median(ts)
    logits = torch.randn(64, V); bm = xgr.allocate_token_bitmask(64, V)
    xgr.apply_token_bitmask_inplace(logits, bm)
    t0 = time.perf_counter()
    for _ in range(100): xgr.apply_token_bitmask_inplace(logits, bm)
    res["apply_64rows_us"] = 1e6 * (time.perf_counter() - t0) / 100
    return res

def llg_mask(tok, grams):
    res = {}
    for name, text in ANSWERS.items():
        ids = hf.encode(text, add_special_tokens=False)
        m = llg.LLMatcher(tok, grams[name], log_level=0); bm = llgt.allocate_token_bitmask(1, V); ts = []
        for t in ids:
            t0 = time.perf_counter(); llgt.fill_next_token_bitmask(m, bm, 0); ts.append(time.perf_counter() - t0)
            if not m.consume_token(t): break
        res[name] = 1e6 * statistics.median(ts)
    return res

xinfo, xg, xo = xg_all(); xo["mask_fill_median_us"] = xg_mask(xinfo, xg)
ltok, lg, lo = llg_all(); lo["mask_fill_median_us"] = llg_mask(ltok, lg)
print(json.dumps({"vocab_size": V, "note": "times in ms (compile) and microseconds (mask fill, median per token); "
                  "apply_64rows_us: xgrammar's CPU bitmask apply on 64 rows",
                  "xgrammar": xo, "llguidance": lo}, indent=1))
