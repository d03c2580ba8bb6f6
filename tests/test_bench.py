"""The benchmarks' own arithmetic and checks: their FLOP counts against PyTorch's FLOP counter, the gradient check
that guards every timing, the flags they refuse, and the tables they print and render into the README. The timings
themselves are the benchmarks' business (bench/), never a test's."""

import argparse
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import fastgpt
from bench import bench_overhead, common, cuda_compile, profile_kernels, readme_table
from bench.bench_model import flops_per_token
from bench.bench_seq2seq import step_flops
from fastgpt.models.gpt1 import GPT1, GPT1Config
from fastgpt.models.seq2seq import Seq2SeqConfig, Seq2SeqTransformer


def _counted_flops(step) -> int:
    """The matrix-product FLOPs PyTorch counts in step() (forward and backward) on the reference backend."""
    with fastgpt.use_backend("reference"), FlopCounterMode(display=False) as counter:
        step()
    return counter.get_total_flops()


def _vector_parameters(module: torch.nn.Module) -> int:
    """Biases and norm weights: 6 FLOPs per token each in the 6N convention, none in a matrix product."""
    return sum(p.numel() for p in module.parameters() if p.dim() < 2)


@pytest.mark.parametrize("src_len,tgt_len", [(8, 16), (16, 8), (11, 11)])
def test_seq2seq_step_flops_match_the_counted_products(src_len, tgt_len):
    """The cross-attention's key and value projections run over the source: with src_len != tgt_len, counting them
    per target token was off by 5-7% here."""
    config = Seq2SeqConfig(97, 97, d_model=32, nhead=4, num_encoder_layers=2, num_decoder_layers=3,
                           dim_feedforward=64, share_embeddings=True, dropout=0.0)
    torch.manual_seed(0)
    model, batch = Seq2SeqTransformer(config), 2
    src, tgt = torch.randint(3, 97, (batch, src_len)), torch.randint(3, 97, (batch, tgt_len))
    counted = _counted_flops(lambda: model(src, tgt, tgt).loss.backward())
    vectors = 6 * batch * (src_len * _vector_parameters(model.transformer.encoder)
                           + tgt_len * _vector_parameters(model.transformer.decoder))
    # The estimate skips the causal self-attention's upper triangle; the counter sees the dense product.
    upper = 3 * 4 * config.d_model * batch * config.num_decoder_layers * tgt_len ** 2 / 2
    assert step_flops(model, batch, src_len, tgt_len) - vectors + upper == counted


def test_gpt1_flops_per_token_match_the_counted_products():
    config = GPT1Config(vocab_size=101, n_positions=24, n_embd=32, n_layer=2, n_head=4, n_inner=64,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    torch.manual_seed(0)
    model, batch = GPT1(config), 2
    ids = torch.randint(0, 101, (batch, config.n_positions))
    counted = _counted_flops(lambda: model(ids, labels=ids).loss.backward())
    tokens = batch * config.n_positions
    # 6N counts the token embedding once, as the tied output projection; the counter sees the projection's product.
    vectors = 6 * tokens * _vector_parameters(model)
    assert flops_per_token(model) * tokens - vectors == counted


def test_check_gradients_refuses_a_wrong_backward():
    torch.manual_seed(0)
    expected = [torch.randn(5, 7, dtype=torch.float64), torch.randn(7, dtype=torch.float64)]
    common.check_gradients("ok", [e.float() for e in expected], expected, torch.float32)
    with pytest.raises(AssertionError, match="zeros: gradient of input 1 is wrong"):
        common.check_gradients("zeros", [expected[0].float(), torch.zeros(7)], expected, torch.float32)
    with pytest.raises(AssertionError, match="half: gradient of input 0 is wrong"):
        common.check_gradients("half", [0.5 * e.to(torch.bfloat16) for e in expected], expected, torch.bfloat16)


@pytest.mark.parametrize("flag,value,message", [
    (common.positive_int, "0", "expected an int >= 1, got '0'"),
    (common.positive_int, "two", "expected an int >= 1, got 'two'"),
    (common.probability, "1", r"expected a probability in \[0, 1\), got '1'"),
    (common.probability, "nan", r"expected a probability in \[0, 1\), got 'nan'"),
    (common.device_flag, "foo", "expected a device such as cpu, cuda or cuda:1, got 'foo'"),
    (common._dtype_list, "float32,float8", "float8"),
    (common._compile_modes, "fastest", "expected 'none' or some of default"),
])
def test_benchmark_flags_name_what_they_expected(flag, value, message):
    with pytest.raises(argparse.ArgumentTypeError, match=message):
        flag(value)


def test_device_flag_refuses_a_gpu_this_machine_lacks():
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    with pytest.raises(argparse.ArgumentTypeError, match=f"'cuda:{count}'"):
        common.device_flag(f"cuda:{count}")


def _row(impl: str, median_ms: float, metric: float = 1.0, unit: str = "TFLOP/s") -> common.Row:
    return common.Row("model", "gpt1 8x512", "bfloat16", "fwd+bwd", impl, median_ms, 0.9 * median_ms,
                      1.1 * median_ms, metric, unit)


def test_printed_table_columns_stay_aligned(capsys):
    rows = [_row("fastgpt-csrc", 12.5, 1234567.8, "tokens/s"), _row("torch-eager", 1234.5, 12.3, "tokens/s")]
    common.mark_speedups(rows)
    common.print_table(rows, {"device": "test", "torch": "2", "triton": "3", "date": "today"})
    header, rule, *lines = capsys.readouterr().out.strip().splitlines()[1:]
    assert len(lines) == 2 and all(len(line) == len(header) == len(rule) for line in lines)
    rate_end, speedup_end = header.index("rate") + len("rate"), len(header)  # right-aligned under their titles
    assert [line[:rate_end].split()[-2:] for line in lines] == [["1234567.8", "tokens/s"], ["12.3", "tokens/s"]]
    assert [line[:speedup_end].split()[-1] for line in lines] == ["98.76x", "-"]


def test_readme_table_names_every_run_it_draws_on(tmp_path):
    folder = tmp_path / "gpu"
    folder.mkdir()
    runs = {"attention": ("2.11.0", "2026-11-20T10:00:00+00:00"), "model": ("2.12.0", "2026-11-22T10:00:00+00:00")}
    for op, (version, date) in runs.items():
        # fastgpt-csrc-mma-sync: a non-default setting, faster here, which the table must not report as fastgpt's.
        rows = [_row("fastgpt-triton", 2.0), _row("fastgpt-csrc", 1.5), _row("fastgpt-csrc-mma-sync", 1.0),
                _row("torch-sdpa", 3.0), _row("torch-x", 4.0)]
        for r in rows:
            r.op = op
        env = {"device": "NVIDIA H100", "torch": version, "triton": "3.6.0", "cuda": "12.8", "date": date}
        (folder / f"{op}.json").write_text(json.dumps({"environment": env, "rows": [vars(r) for r in rows]}))
    (folder / "translation.json").write_text(json.dumps({"bleu": 30.0}))  # a training record: not a benchmark
    table = readme_table.render(tmp_path)
    assert table.startswith("**NVIDIA H100** (torch 2.11.0 / 2.12.0, triton 3.6.0, CUDA 12.8, 2026-11-20 to "
                            "2026-11-22)")
    lines = [line for line in table.splitlines() if line.startswith("| attention") or line.startswith("| model")]
    assert len(lines) == 2
    assert all("fastgpt-csrc 1.500 ms" in line and "torch-sdpa 3.000 ms | 2.00x" in line for line in lines)


def test_a_run_stopped_part_way_keeps_its_rows_and_says_so(tmp_path):
    args = common.standard_parser("test").parse_args(["--out", str(tmp_path)])
    info = {"device": "NVIDIA H100", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0",
            "date": "2026-11-25T10:00:00+00:00"}

    def measure(median_ms):
        if median_ms == 3.0:
            raise RuntimeError("the call's time limit")
        rows = [_row("fastgpt-triton", median_ms), _row("torch-sdpa", 2 * median_ms)]
        for row in rows:
            row.shape = f"shape {median_ms}"
        return rows

    with pytest.raises(RuntimeError):
        common.run_grid("model", [(1.0,), (2.0,), (3.0,)], measure, info, args)
    data = json.loads((tmp_path / "nvidia-h100" / "model.json").read_text())
    assert data["environment"]["partial"] == "2 of 3 shapes measured"
    assert [(r["impl"], r["median_ms"], r["speedup_vs_best_peer"]) for r in data["rows"]] == [
        ("fastgpt-triton", 1.0, 2.0), ("torch-sdpa", 2.0, None),
        ("fastgpt-triton", 2.0, 2.0), ("torch-sdpa", 4.0, None)]
    assert "(partial: 2 of 3 shapes measured) |" in readme_table.render(tmp_path)

    common.run_grid("model", [(1.0,), (2.0,)], measure, info, args)
    data = json.loads((tmp_path / "nvidia-h100" / "model.json").read_text())
    assert "partial" not in data["environment"] and len(data["rows"]) == 4
    assert "partial" not in readme_table.render(tmp_path)


def test_time_calls_queues_gpu_calls_and_reads_their_events_once_per_batch(monkeypatch):
    """On a GPU, time_calls queues a batch of calls between events and synchronizes once per batch: each call's
    time is its own events' (here a fake clock that each call moves by its cost), rotating through the inputs."""
    clock, syncs, ran = [0.0], [], []

    class Event:
        def __init__(self, enable_timing):
            assert enable_timing

        def record(self):
            self.at = clock[0]

        def synchronize(self):
            syncs.append(len(ran))

        def elapsed_time(self, other):
            return other.at - self.at

    def call(cost):
        def fn():
            ran.append(cost)
            clock[0] += cost
        return fn

    monkeypatch.setattr(torch.cuda, "Event", Event)
    median, p20, p80 = common.time_calls([call(1.0), call(3.0)], torch.device("cuda"), warmup=2, repeats=4,
                                         min_seconds=0.0)
    assert ran == [1.0, 3.0] * 3 and syncs == [6]  # two warm-up calls, then one batch of four, one wait
    assert (median, p20, p80) == (2.0, 1.0, 3.0)


def test_overhead_benchmark_checks_then_times_every_op_both_passes(tmp_path):
    """bench.bench_overhead --quick on this CPU: each op, without grad and forward+backward, for every CPU backend
    it times and PyTorch, after checking their outputs and gradients."""
    bench_overhead.main(["--quick", "--device", "cpu", "--out", str(tmp_path)])
    (result,) = tmp_path.glob("*/overhead.json")
    rows = json.loads(result.read_text())["rows"]
    impls = {f"fastgpt-{name}" for name in common.fastgpt_backends(torch.device("cpu"), False)} | {"torch-eager"}
    assert {(r["op"], r["pass_"], r["impl"]) for r in rows} == {
        (op, pass_, impl) for op in ("layer_norm", "add_layer_norm", "linear_gelu", "attention")
        for pass_ in ("fwd", "fwd+bwd") for impl in impls}
    assert all(r["unit"] == "us/call" and r["metric"] > 0 for r in rows)


def test_quick_runs_keep_out_of_the_recorded_results():
    parser = common.standard_parser("test")
    assert common.results_root(parser.parse_args([])) == common.RESULTS
    assert common.results_root(parser.parse_args(["--quick"])) == common.QUICK_RESULTS != common.RESULTS
    assert common.results_root(parser.parse_args(["--quick", "--out", "elsewhere"])) == Path("elsewhere")


def _ncu_raw_csv(kernels: list[dict[str, str]]) -> str:
    """ncu's raw page as --csv --print-units base writes it: a ==PROF== line, metric names, units, one row per
    kernel (metrics the report lacks for a kernel are empty)."""
    units = {"gpu__time_duration.sum": "nsecond", "launch__shared_mem_per_block_static": "byte",
             "launch__shared_mem_per_block_dynamic": "Kbyte", "sm__throughput.avg.pct_of_peak_sustained_elapsed": "%",
             "launch__grid_size": "", "launch__registers_per_thread": "register/thread"}
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    for reason in ("long_scoreboard", "barrier", "selected", "mio_throttle", "wait"):
        units[stall.format(reason)] = "ratio"
    for counter in ("data_bank_conflicts_pipe_lsu", "data_pipe_lsu_wavefronts"):
        for op in ("ld", "st"):
            units[f"l1tex__{counter}_mem_shared_op_{op}.sum"] = ""
    header = ["ID", "Process ID", "Process Name", "Host Name", "Kernel Name", "Context", "Stream"] + list(units)
    lines = ["==PROF== Disconnected from process 1234", ",".join(f'"{h}"' for h in header),
             ",".join(f'"{u}"' for u in [""] * 7 + list(units.values()))]
    for i, kernel in enumerate(kernels):
        cells = [str(i), "1234", "python", "localhost", kernel["name"], "1", "7"] + \
            [kernel.get(metric, "") for metric in units]
        lines.append(",".join(f'"{c}"' for c in cells))
    return "\n".join(lines) + "\n"


def test_profile_summary_groups_kernels_by_case_marker(tmp_path):
    stall = "smsp__average_warps_issue_stalled_{}_per_issue_active.ratio"
    marker = {"name": "_profile_case_marker", "gpu__time_duration.sum": "1,024"}
    attention = {"name": "void fastgpt::(anonymous namespace)::attention_fwd_kernel<cutlass::bfloat16_t, 64, true>"
                         "(fastgpt::Params const&)",
                 "gpu__time_duration.sum": "152,192", "launch__registers_per_thread": "168",
                 "launch__shared_mem_per_block_static": "1024", "launch__shared_mem_per_block_dynamic": "48",
                 "sm__throughput.avg.pct_of_peak_sustained_elapsed": "71.5",
                 stall.format("long_scoreboard"): "2.5", stall.format("barrier"): "4.25",
                 stall.format("selected"): "9", stall.format("mio_throttle"): "0.5", stall.format("wait"): "1.75",
                 "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_ld.sum": "12",
                 "l1tex__data_bank_conflicts_pipe_lsu_mem_shared_op_st.sum": "3",
                 "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_ld.sum": "1000",
                 "l1tex__data_pipe_lsu_wavefronts_mem_shared_op_st.sum": "500"}
    # The markers' grid sizes name the cases (case number + 1), in whatever order ncu lists them.
    kernels = [{**marker, "launch__grid_size": "2"}, attention, {"name": "_attn_bwd_dq", "gpu__time_duration.sum": "7"},
               {**marker, "launch__grid_size": "1"},
               {"name": "ampere_bf16_s16816gemm", "gpu__time_duration.sum": "500"}]
    folder = tmp_path / "profile"
    folder.mkdir()
    (folder / "raw.csv").write_text(_ncu_raw_csv(kernels))
    (folder / "details.txt").write_text("details page")
    env = {"device": "NVIDIA H100 80GB HBM3", "torch": "2.11.0", "triton": "3.6.0", "cuda": "13.0", "driver": "580",
           "commit": "abc1234", "date": "2026-11-25"}
    (folder / "cases.json").write_text(json.dumps({"environment": env, "cases": ["ffn eager", "attention csrc"]}))
    path = profile_kernels.write_summary(folder, tmp_path / "results")
    assert path == tmp_path / "results" / "nvidia-h100-80gb-hbm3" / "profile.md"
    assert (path.parent / "profile-details.txt").read_text() == "details page"
    text = path.read_text()
    assert "## attention csrc: 152.2 us in 2 kernels" in text and "## ffn eager: 0.5 us in 1 kernels" in text
    assert text.index("## attention csrc") < text.index("## ffn eager")  # launch order
    row = next(line for line in text.splitlines() if line.startswith("| attention_fwd_kernel"))
    cells = [cell.strip() for cell in row.strip("|").split("|")]
    assert cells == ["attention_fwd_kernel<bfloat16_t, 64, true>", "152.2", "72", "-", "-", "-", "-/-", "168",
                     "47.9", "barrier 4.2, long_scoreboard 2.5, wait 1.8", "15/1500"]
    dq = next(line for line in text.splitlines() if line.startswith("| _attn_bwd_dq"))
    assert [cell.strip() for cell in dq.strip("|").split("|")] == ["_attn_bwd_dq", "0.0"] + ["-"] * 4 + ["-/-"] + \
        ["-"] * 4  # metrics the report lacks: dashes, not zeros


def test_profile_summary_refuses_what_is_not_ncu_raw_csv():
    with pytest.raises(ValueError, match="Kernel Name"):
        profile_kernels.read_raw_csv("ID,Name\n0,x\n")


def test_profile_driver_runs_every_case_and_lists_them(tmp_path):
    manifest = tmp_path / "cases.json"
    profile_kernels.main(["--device", "cpu", "--quick", "--manifest", str(manifest)])
    cases = json.loads(manifest.read_text())["cases"]
    assert any(name.startswith("attention") and name.endswith("fastgpt-csrc") for name in cases)
    assert {name.split()[0] for name in cases} == {"attention", "gelu_ffn", "add_layer_norm"}
    assert any(name.endswith("torch-eager") for name in cases)


def test_triton_choices_records_the_autotuners_picks():
    """The triton backend's rows name the config each autotuned kernel launched with; other rows record nothing,
    and the kernels are left as they were."""
    kernels = pytest.importorskip("fastgpt.kernels.attention")
    if "triton" not in fastgpt.available_backends("cpu"):
        pytest.skip("the triton backend does not run here")
    q, k, v = (torch.randn(1, 2, 24, 16, dtype=torch.float16, requires_grad=True) for _ in range(3))
    with common.triton_choices("torch-sdpa-math") as choices:
        pass
    assert choices == set()
    with common.triton_choices("fastgpt-triton") as choices, fastgpt.use_backend("triton"):
        out = fastgpt.ops.scaled_dot_product_attention(q, k, v, is_causal=True)
        out.sum().backward()
    assert sorted(choice.split(":")[0] for choice in choices) == ["_attn_bwd_dkdv", "_attn_bwd_dq", "_attn_fwd"]
    assert all("USE_TMA: False" in choice and "num_warps" in choice for choice in choices), choices
    assert all("run" not in vars(kernel) for kernel in kernels.AUTOTUNED)


def test_cuda_compile_reads_ptxas_and_sass():
    """bench.cuda_compile's parsers on the formats of ptxas -v and cuobjdump -sass (nvcc 13.0), predicated and
    uniform-predicated instructions included; demangling where c++filt is installed."""
    mangled = "_ZN7fastgpt9attention20attention_fwd_kernelI6__halfLi64ELNS0_8MaskModeE1ELb1ELb1EEEvNS0_6ParamsE"
    log = (f"ptxas info    : Compiling entry function '{mangled}' for 'sm_90a'\n"
           "ptxas info    : Function properties for " + mangled + "\n"
           "    8 bytes stack frame, 4 bytes spill stores, 12 bytes spill loads\n"
           "ptxas info    : Used 107 registers, used 1 barriers, 400 bytes cmem[0]\n")
    assert cuda_compile.parse_ptxas(log) == {mangled: {"regs": 107, "stack": 8, "spill_stores": 4,
                                                       "spill_loads": 12}}
    sass = (f"\t\tFunction : {mangled}\n"
            "        /*0100*/                   LDGSTS.E.BYPASS.LTC128B.128 [R5], desc[UR8][R2.64] ;\n"
            "        /*0110*/              @!P0 LDGSTS.E.BYPASS.LTC128B.128 [R7], desc[UR8][R4.64], P1 ;\n"
            "        /*68f0*/                   HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], RZ, !UPT ;\n"
            "        /*6900*/              @UP0 HGMMA.64x64x16.F32.BF16 R88, gdesc[UR8], R88 ;\n"
            "        /*6910*/                   WARPGROUP.DEPBAR.LE gsb0, 0x0 ;\n"
            "\t\tFunction : other\n"
            "        /*0010*/                   HMMA.16816.F32.BF16 R4, R8, R12, R4 ;\n")
    counts = cuda_compile.count_opcodes(sass)
    assert counts[mangled] == {"LDGSTS": 2, "HGMMA": 2} and counts["other"] == {"HMMA": 1}
    if shutil.which("c++filt"):
        assert cuda_compile.demangle([mangled]) == {mangled: "attention_fwd_kernel<__half, 64, kCausal, true, true>"}
