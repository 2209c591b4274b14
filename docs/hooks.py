"""MkDocs hook: the site shows figures from their one record in ``benchmarks/results/``, copied
into the built site at build time (never committed twice)."""

from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
FIGURES = {"assets/padding_report.png": ROOT / "benchmarks" / "results" / "padding-report" / "padding_report.png"}


def on_files(files, config):
    for dest, src in FIGURES.items():
        files.append(File.generated(config, dest, abs_src_path=str(src)))
    return files
