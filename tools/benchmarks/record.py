"""``--record ID``: a benchmark's printed tables appended to ``docs/data/benchmarks.yml``.

Every script of ``tools/benchmarks/`` takes the options of :func:`add_arguments` and calls
:func:`record` with what it printed. With ``--record ID`` each Markdown table of that output becomes
one measurement of the data file (the first named ``ID``, further ones ``ID-2``, ``ID-3``, ...), with
the date, the commit (``-dirty`` when tracked files differ from it), the machine, the command that
reproduces it (run from the repository root) and the table's rows; the line printed just above a
table (the script's description of the setting) opens the measurement's note. The measurement is
also shown: its generated block is inserted into ``docs/cost.md`` below the line
:data:`RECORDED_MARKER` (newest first) and rendered there, so ``make docs`` publishes it; move the
block to the section it belongs to when you describe it.

    .venv/bin/python tools/benchmarks/benchmark_fixed_cost.py --record fixed-cost-gpu \\
        --machine dev-cpu-2 --note 'idle machine'
"""
import contextlib
import datetime
import io
import hashlib
import os
import os.path as osp
import platform
import re
import shlex
import subprocess
import sys
from typing import Dict, List, Optional, Sequence, Tuple

import yaml

REPO = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
if osp.join(REPO, 'tools') not in sys.path:
    sys.path.insert(0, osp.join(REPO, 'tools'))
import docs_tables  # noqa: E402

PAGE = osp.join(REPO, 'docs', 'cost.md')
RECORDED_MARKER = '<!-- measurements recorded with --record: inserted below, newest first -->'
#: options that say where and how to record, left out of the recorded command
OWN_OPTIONS = ('--record', '--title', '--note', '--machine')
#: environment variables that change what a benchmark measures, kept in the recorded command
ENVIRONMENT = ('OMP_NUM_THREADS', 'MKL_NUM_THREADS', 'CUDA_VISIBLE_DEVICES')


def add_arguments(parser) -> None:
    """The recording options; ``--title`` defaults to the parser's description."""
    group = parser.add_argument_group('recording into docs/data/benchmarks.yml')
    group.add_argument('--record', metavar='ID',
                       help='append the printed tables to docs/data/benchmarks.yml as measurement '
                            'ID (further tables: ID-2, ...) and show it in docs/cost.md')
    group.add_argument('--title', default=parser.description,
                       help='the measurement\'s title (default: the script\'s description)')
    group.add_argument('--note', help='a note shown under the table (the state of the machine, ...)')
    group.add_argument('--machine', metavar='KEY',
                       help='a key of `machines` in the data file; default: one described from '
                            'this machine (CPU, GPU, torch, threads), added when new')


class _Tee(io.StringIO):
    def __init__(self, stream):
        super().__init__()
        self.stream = stream

    def write(self, text):
        self.stream.write(text)
        return super().write(text)

    def flush(self):
        self.stream.flush()


@contextlib.contextmanager
def printed():
    """Within the block, what is printed still goes to stdout and is also kept: the context's value
    is a StringIO whose ``getvalue()`` is the output (for scripts that print as they go)."""
    tee = _Tee(sys.stdout)
    with contextlib.redirect_stdout(tee):
        yield tee


def parse_tables(text: str) -> List[Tuple[str, List[str], List[List[str]]]]:
    """The Markdown tables of a script's output: ``(caption, columns, rows)`` each, the caption
    being the last non-empty line above the table ('' when none)."""
    tables, caption, lines = [], '', text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        if line.startswith('|') and i + 1 < len(lines) and re.match(r'^\|(\s*:?-+:?\s*\|)+$',
                                                                     lines[i + 1].strip()):
            columns = _cells(line)
            rows = []
            i += 2
            while i < len(lines) and lines[i].strip().startswith('|'):
                rows.append(_cells(lines[i].strip()))
                i += 1
            tables.append((caption, columns, rows))
            caption = ''
            continue
        if line:
            caption = line
        i += 1
    return tables


def _cells(line: str) -> List[str]:
    return [cell.strip() for cell in line.strip('|').split('|')]


#: CPU features that change what the kernels measured can do (the widest vectors, bfloat16 units),
#: as /proc/cpuinfo names them, and in words
CPU_FEATURES = (('amx_bf16', 'AMX'), ('avx512_bf16', 'AVX-512 BF16'), ('avx512f', 'AVX-512'),
                ('avx2', 'AVX2'))


def describe_machine() -> str:
    """CPU model, count and vector features, GPU, OS, torch and its thread count, in words."""
    import torch
    cpu, features = platform.processor() or platform.machine(), []  # (features: none known)
    try:
        with open('/proc/cpuinfo') as f:
            info = f.read()
        flags = set(re.search(r'^flags\s*:\s*(.+)$', info, re.M).group(1).split())
        features = [words for flag, words in CPU_FEATURES if flag in flags] or ['no AVX2']
        cpu = re.search(r'^model name\s*:\s*(.+)$', info, re.M).group(1).strip()
    except (OSError, AttributeError):
        pass
    words = [f'{cpu} ({os.cpu_count()} logical CPUs' + ''.join(f', {f}' for f in features) + ')']
    if torch.cuda.is_available():
        words.append(f'{torch.cuda.get_device_name(0)} (CUDA {torch.version.cuda})')
    threads = torch.get_num_threads()
    words.append(f'{platform.system()}, torch {torch.__version__}, {threads} '
                 f'thread{"s" if threads != 1 else ""}')
    return ', '.join(words)


def current_commit(repo: str = REPO) -> str:
    """HEAD's short hash, with ``-dirty`` when tracked files differ from it."""
    def git(*args):
        return subprocess.run(['git', '-C', repo, *args], capture_output=True, text=True)
    head = git('rev-parse', '--short=7', 'HEAD')
    if head.returncode != 0:
        return 'unknown'
    dirty = git('diff', '--quiet', 'HEAD', '--').returncode != 0
    return head.stdout.strip() + ('-dirty' if dirty else '')


def command_line(script: str, argv: Sequence[str], environ=os.environ) -> str:
    """The command that reproduces the run from the repository root, without the recording
    options."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        name = arg.split('=', 1)[0]
        if name in OWN_OPTIONS:
            skip = '=' not in arg
            continue
        kept.append(arg)
    in_venv = osp.basename(osp.dirname(osp.dirname(sys.executable))) == '.venv'
    env = [f'{key}={shlex.quote(environ[key])}' for key in ENVIRONMENT if key in environ]
    script = osp.relpath(osp.abspath(script), REPO)
    return ' '.join(env + ['.venv/bin/python' if in_venv else 'python', script]
                    + [shlex.quote(a) for a in kept])


def _machine_key(machines: Dict[str, str], text: str) -> Tuple[str, bool]:
    """The key of the machine described by ``text``, and whether it is new."""
    for key, known in machines.items():
        if known == text:
            return key, False
    return 'auto-' + hashlib.sha1(text.encode()).hexdigest()[:8], True


def _dump(value, flow=None) -> str:
    """YAML in the data file's style: lists of scalars (columns, rows) in flow style."""
    return yaml.safe_dump(value, sort_keys=False, allow_unicode=True, width=10 ** 6,
                          default_flow_style=flow)


def record(args, output: str, script: str, argv: Optional[Sequence[str]] = None,
           data: Optional[str] = None, page: Optional[str] = None,
           today: Optional[str] = None) -> List[str]:
    """With ``args.record``: append the tables of ``output`` to ``data`` as measurements and show
    them in ``page``; returns the ids recorded (none without ``--record``).

    Args:
        args: the parsed options of :func:`add_arguments` (with the script's own).
        output: what the script printed (its Markdown tables and the lines above them).
        script: the script's path (``__file__``), for the recorded command.
        argv: the script's arguments (default ``sys.argv[1:]``).
        data, page: the data file and the page that shows new measurements (default
            ``docs/data/benchmarks.yml``, ``docs/cost.md``).
        today: the date to record (default today's, ISO).
    """
    if not getattr(args, 'record', None):
        return []
    data, page = data or docs_tables.BENCHMARKS, page or PAGE
    tables = parse_tables(output)
    if not tables:
        raise ValueError(f'--record {args.record}: the output holds no Markdown table')
    with open(data, encoding='utf-8') as f:
        text = f.read()
    known = yaml.safe_load(text)
    ids = [args.record] + [f'{args.record}-{i}' for i in range(2, len(tables) + 1)]
    taken = {m['id'] for m in known.get('measurements') or []} & set(ids)
    if taken:
        raise ValueError(f'{data} already has measurement(s) {sorted(taken)}: choose another ID')
    if args.machine:
        if args.machine not in known['machines']:
            raise ValueError(f'--machine {args.machine}: not among the machines of {data} '
                             f'({sorted(known["machines"])})')
        machine, new_machine = args.machine, False
    else:
        description = describe_machine()
        machine, new_machine = _machine_key(known['machines'], description)
    command = command_line(script, sys.argv[1:] if argv is None else argv)
    entries = []
    for i, (caption, columns, rows) in enumerate(tables):
        title = (args.title or osp.basename(script)).rstrip('.')
        if i:
            title = f'{title}: {caption.rstrip(":.")}' if caption else f'{title} ({i + 1})'
        note = ' '.join(filter(None, [caption.rstrip(':') + '.' if caption and not i else '',
                                      args.note]))
        entry = dict(id=ids[i], title=title,
                     date=today or datetime.date.today().isoformat(),
                     commit=current_commit(), machine=machine, host=describe_machine(),
                     command=command)
        if note:
            entry['note'] = note
        entries.append(dict(entry, columns=columns, rows=rows))
    if new_machine:
        machines = re.search(r'^machines:[^\n]*\n((?:[ \t]+[^\n]*\n)*)', text, re.M)
        text = (text[:machines.end()] + _indent(_dump({machine: description}, flow=False))
                + text[machines.end():])
    text = text.rstrip('\n') + '\n' + ''.join('\n' + _dump([e]) for e in entries)
    docs_tables.check_benchmarks(yaml.safe_load(text), data)  # refuses before writing anything
    with open(page, encoding='utf-8') as f:
        shown = f.read()
    if RECORDED_MARKER not in shown:
        raise ValueError(f'{page} has no line {RECORDED_MARKER!r} to insert the measurement below')
    with open(data, 'w', encoding='utf-8') as f:
        f.write(text)
    blocks = ''.join(f'\n<!-- generated by tools/docs_tables.py: benchmark:{i} -->\n'
                     f'<!-- end of generated: benchmark:{i} -->\n' for i in ids)
    shown = shown.replace(RECORDED_MARKER, RECORDED_MARKER + '\n' + blocks.rstrip('\n'), 1)
    with open(page, 'w', encoding='utf-8') as f:
        f.write(docs_tables.regenerate(shown, benchmarks=data))
    print(f'recorded {", ".join(ids)} in {osp.relpath(data, REPO)}, shown in '
          f'{osp.relpath(page, REPO)}' + (f' (new machine {machine}: describe it better there if '
                                          f'you like)' if new_machine else ''))
    return ids


def _indent(text: str) -> str:
    return ''.join('  ' + line + '\n' for line in text.splitlines())
