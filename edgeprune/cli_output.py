"""What the commands print: the build summary and a benchmark record, for humans."""

from __future__ import annotations

import click

from edgeprune.chat_health import summary as chat_summary

MIB = 1 << 20


def print_summary(result) -> None:
    report, search = result.report, result.report["search"]
    sel = next((c for c in search["candidates"] if c["selected"]), None)
    device = report["device"]
    where = f"measured on {device['url']} ({device['arch']})"
    if not device["is_target_arch"]:
        where += f", a stand-in for the {report['target']['hardware']['arch']} target: not verified on the target"
    echo = click.echo
    echo("")
    searched = [c for c in search["candidates"] if not c.get("recovered_from")]
    built, recovered = len(searched), len(search["candidates"]) - len(searched)
    timed = sum(c["measured"] for c in searched)
    skipped = f" ({built - timed} predicted out of budget, not timed)" if timed < built else ""
    again = f", {recovered} recovered (timed as their twins)" if recovered else ""
    echo(f"Candidates: {built} built, {timed} timed{skipped}{again}; budget: {search['budget']['description']}")
    if sel is None:
        echo(f"SLO:        NOT met ({where})")
        echo(f"Report:     {result.output_dir / 'report.html'} (plots; tables in report.md)")
        return
    artifact = result.output_dir / report["artifact"]
    echo(f"Artifact:   {artifact} ({sel['size_bytes'] / MIB:.1f} MiB)")  # an ONNX file's weights are beside it
    pruned = sel["step"] if sel["step"] != "unpruned" else "nothing (the unpruned model meets the budget)"
    echo(f"Pruned:     {pruned}")
    if sel.get("recovered_from"):
        twin = next(c for c in search["candidates"] if c["id"] == sel["recovered_from"])
        echo(f"Recovered:  {sel['recovery']['description']}, {sel['recovery']['steps']} steps: mean KLD "
             f"{twin['mean_kld']:.3f} -> {sel['mean_kld']:.3f}")
        chat = report["search"].get("recovery", {}).get("chat")
        if chat:
            echo(f"Chat:       answers {chat_summary(chat['after'])} (before recovery {chat_summary(chat['before'])})")
    echo(f"SLO:        met: p90 {sel['latency_p90_s']:.3f} s, {sel['speedup']:.2f}x faster than the unpruned "
         f"model timed alongside ({where})")
    echo(f"Quality:    mean KLD {sel['mean_kld']:.3f}, top-1 agreement {sel['top1_agreement'] * 100:.1f}%, "
         f"perplexity {sel['perplexity']:.2f} (reference {report['calibration']['reference_perplexity']:.2f})")
    echo(f"Report:     {result.output_dir / 'report.html'} (plots; tables in report.md)")


def print_bench(r) -> None:
    rec, s = r.record, r.record.summary
    label = " (emulated)" if rec.emulated else ""
    click.echo(f"Model:      {r.model.name} ({r.size_bytes / MIB:.1f} MiB)")
    click.echo(f"Device:     {r.device} ({r.arch}{', ' + rec.cpu if rec.cpu else ''}), {rec.threads} threads"
               f"{', pinned to cores ' + ','.join(map(str, rec.cpus)) if rec.cpus else ''}; {rec.runtime}")
    if rec.ram_cap_exceeded:
        click.echo(f"Killed:     over the RAM cap at {rec.peak_rss_bytes / MIB:.0f} MiB RSS; no timings")
    else:
        click.echo(f"Runs:       {s['repetitions']} timed ({rec.runner}){label}")
        click.echo(f"TTFT:       {s['ttft_p50_s'] * 1000:.0f} ms p50; prefill {s['prefill_tok_s_p50']:.1f} tok/s")
        click.echo(f"Decode:     {s['decode_tok_s_p50']:.1f} tok/s p50")
        click.echo(f"Latency:    p50 {s['latency_p50_s']:.3f} s, p90 {s['latency_p90_s']:.3f} s, p99 "
                   f"{s['latency_p99_s']:.3f} s (spread {s['latency_spread'] * 100:.0f}%)")
        click.echo(f"Peak RSS:   {rec.peak_rss_bytes / MIB:.0f} MiB")
        if rec.baseline_runs:
            apart = "; one model per process, alternating" if rec.one_model_per_process else ""
            click.echo(f"Speed-up:   {rec.speedup:.2f}x over the baseline timed alongside "
                       f"({s['paired_speedup_min']:.2f}-{s['paired_speedup_max']:.2f}{apart})")
    if r.roofline:
        f = r.roofline
        click.echo(f"Roofline:   decode at {f['fraction'] * 100:.0f}% of the bandwidth limit "
                   f"({f['roofline_tok_s']:.0f} tok/s = {f['bandwidth_gbs']:.1f} GB/s / "
                   f"{f['bytes_per_token'] / MIB:.1f} MiB per token; "
                   f"{f['bandwidth_source']})")
    if r.estimate:
        click.echo(f"Estimate:   {r.estimate['description']}")
    for note in r.notes:
        click.echo(f"Note:       {note}")
    click.echo(f"Verdict:    {r.verdict} ({r.budget.describe() or 'no budget'})")


def print_prune(r) -> None:
    """What `prune` and `recover` made: plan, file, quality (before and after recovery)."""
    q = r.quality
    click.echo("")
    gguf = r.artifact.endswith(".gguf")
    click.echo(f"Plan:       {r.description}" + (f" (GGUF architecture {r.architecture})" if gguf else ""))
    if r.structured is not None:
        a = r.structured["analysis"]
        click.echo(f"Method:     {r.structured['description']}; importance in {a['seconds']:.1f} s ({a['runner']}"
                   + (f", peak RSS {a['peak_rss_bytes'] / MIB:.0f} MiB)" if a["peak_rss_bytes"] else ")"))
    click.echo(f"Artifact:   {r.output_dir / r.artifact} ({r.size_bytes / MIB:.1f} MiB, {r.parameters:,} parameters)")
    if r.recovery is not None:
        b, rec = r.recovery["before"], r.recovery
        click.echo(f"Before:     mean KLD {b['mean_kld']:.3f}, top-1 agreement {b['top1_agreement'] * 100:.1f}%, "
                   f"perplexity {b['perplexity']:.2f} (pruned, not recovered)")
        click.echo(f"Recovery:   {rec['description']}: {rec['steps']} steps, {rec['tokens']:,} tokens in "
                   f"{rec['seconds'] / 60:.1f} min; {rec['recovered_share'] * 100:.0f}% of the KLD recovered")
        if "chat" in rec:
            click.echo(f"Chat:       answers before recovery {chat_summary(rec['chat']['before'])}; after "
                       f"{chat_summary(rec['chat']['after'])}")
    click.echo(f"Quality:    mean KLD {q.mean_kld:.3f}, top-1 agreement {q.top1_agreement * 100:.1f}%, "
               f"perplexity {q.perplexity:.2f} (reference {r.reference_perplexity:.2f})")
    if r.sparsity is not None:
        sp, peak = r.sparsity, r.sparsity["peak_rss_bytes"]
        click.echo(f"Sparsity:   {sp['overall_sparsity'] * 100:.1f}% of decoder weights zero in {sp['seconds']:.1f} s"
                   + (f" (peak RSS {peak / MIB:.0f} MiB)" if peak else "")
                   + (f"; {sp['gguf']['decoder_zero_share'] * 100:.1f}% still zero in the {sp['gguf']['quant']} "
                      "GGUF (no speed-up in llama.cpp)" if "gguf" in sp else ""))
    held = "the GGUF" if gguf else "the ONNX file"
    click.echo(f"HF:         {r.hf_dir}" if r.hf_dir else f"HF:         none: {r.hf_note}; {held} holds the model")
