"""The documentation: what the README and the pages in docs/ state about the code, checked against
the code; the generated tables equal to their sources; the site builds with warnings as errors."""
import argparse
import ast
import fnmatch
import glob
import inspect
import os.path as osp
import re
import shlex
import subprocess
import sys

import pytest
import yaml
from mmengine.config import Config, DictAction

import cbn_mmdet  # noqa: F401
from cbn_mmdet.engine import hooks

from conftest import REPO_ROOT as REPO  # noqa: E402
import docs_tables  # noqa: E402
import paper_results  # noqa: E402


def read(path: str) -> str:
    with open(osp.join(REPO, path)) as f:
        return f.read()


README = read('README.md')
HOOKS_PAGE = 'docs/user_guide/hooks.md'
GETTING_STARTED = 'docs/getting_started.md'


@pytest.mark.parametrize('hook', ['CBNBurnInHook', 'NormSwitchHook', 'CBNMonitorHook',
                                  'RNGStateHook'])
def test_hook_signatures_in_the_docs_show_the_code_defaults(hook):
    page = read(HOOKS_PAGE)
    match = re.search(r'`' + hook + r'\(([^`]*)\)`', page)
    assert match, f'{HOOKS_PAGE} shows no `{hook}(...)` signature'
    defaults = {name: p.default for name, p in
                inspect.signature(getattr(hooks, hook).__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    for item in filter(None, (a.strip() for a in re.split(r',\s*(?=\w+=)', match.group(1)))):
        name, value = item.split('=', 1)
        try:
            shown = ast.literal_eval(value)
        except ValueError:  # a set of allowed values, e.g. None|int|'auto'
            shown = ast.literal_eval(value.split('|')[0])
        assert name in defaults, f'{hook}: {HOOKS_PAGE} shows {name}, the code has no such argument'
        assert shown == defaults[name], \
            f'{hook}: {HOOKS_PAGE} says {name}={value}, code {defaults[name]!r}'


def test_demo_smoke_run_in_the_docs_reaches_cbn():
    """The demo smoke run on the getting-started page trains some iterations after the burn-in."""
    args = re.search(r"DEMO_TRAIN_ARGS='--cfg-options ([^']*)'", read(GETTING_STARTED)).group(1)
    cfg = Config.fromfile(osp.join(REPO, 'configs', 'demo', 'faster-rcnn_r18_fpn_demo-shapes.py'))
    parser = argparse.ArgumentParser()
    parser.add_argument('--cfg-options', nargs='+', action=DictAction)
    cfg.merge_from_dict(parser.parse_args(['--cfg-options', *shlex.split(args)]).cfg_options)
    burn_in = next(h for h in cfg.custom_hooks if h.type == 'CBNBurnInHook').burn_in
    assert burn_in < cfg.train_cfg.max_iters


def test_mmcv_build_time_is_stated_alike_everywhere():
    figures = {}
    for name in ('README.md', GETTING_STARTED, 'Makefile', '.ci/run', 'tools/setup_env.sh'):
        found = set(re.findall(r'(\d+)\s*[-–]\s*(\d+) minutes\W+on\W+2 cores', read(name)))
        assert found, f'{name} states no build time'
        figures[name] = found
    assert len(set.union(*figures.values())) == 1, figures


def test_readme_is_short_and_has_what_a_newcomer_needs_first():
    lines = README.splitlines()
    assert len(lines) <= 250, f'README.md has {len(lines)} lines: move detail into docs/'
    first_screen = '\n'.join(lines[:20])
    for what in ('make demo', 'make test', "type='CBN'", 'Does it help', 'Cost'):
        assert what in first_screen, f'the README\'s first screenful does not mention {what!r}'
    headings = re.findall(r'^## (.+)$', README, re.M)
    for heading in ('What CBN is', 'Install', 'Quick start', 'Use in an mmdet config',
                    'Use in plain PyTorch', 'Which normalizer',
                    'What has been measured, and what has not',
                    'Where CBN differs from BatchNorm2d', 'Reproducing the paper', 'Documentation'):
        assert heading in headings, f'README has no section {heading!r}'


def _test_functions():
    """{test file name: names of its test functions}."""
    names = {}
    for path in glob.glob(osp.join(REPO, 'tests', '**', 'test_*.py'), recursive=True):
        tree = ast.parse(read(osp.relpath(path, REPO)))
        names.setdefault(osp.basename(path), set()).update(
            n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef))
    return names


@pytest.mark.parametrize('page', ['README.md', 'docs/guarantees.md', 'docs/user_guide/modes.md'])
def test_tests_named_in_the_docs_exist(page):
    """Every `test_file.py::test_name` a page cites (``::name`` continues the last file; * globs)
    names a test function that exists: a renamed test cannot leave the docs pointing at nothing."""
    functions = _test_functions()
    missing, cited = [], 0
    for span in re.findall(r'`([^`]*)`', read(page)):
        file_match = re.match(r'(?:tests/[\w/]*/)?(test_\w+\.py)(::.*)?$', span)
        if file_match:
            current = file_match.group(1)
            assert current in functions, f'{page} cites {current}, which does not exist'
            rest = file_match.group(2)
        elif span.startswith('::'):
            rest = span
        elif re.match(r'\[[\w,=*.-]+\]$', span):  # `[row-CBN]`: another case of the last test
            continue
        else:
            continue
        if not rest:
            continue
        name = re.match(r'::([\w*]+)', rest).group(1)
        cited += 1
        if not fnmatch.filter(functions[current], name):
            missing.append(f'{current}::{name}')
    assert cited, f'{page} cites no test'
    assert not missing, f'{page} cites tests that do not exist: {missing}'


def test_generated_tables_equal_their_sources():
    """README.md and docs/ hold the tables tools/docs_tables.py writes from the data files
    (paper_results.yml, docs/data/*.yml): a number changed in one place only fails here."""
    stale = []
    for path in docs_tables.documents():
        with open(path) as f:
            text = f.read()
        if docs_tables.regenerate(text) != text:
            stale.append(osp.relpath(path, REPO))
    assert not stale, f'regenerate with: .venv/bin/python tools/docs_tables.py ({stale})'


def _tables(path):
    """The Markdown tables of a page, each as its list of lines."""
    return _tables_of(open(path, encoding='utf-8').read())


def _tables_of(text):
    """The Markdown tables of a text, each as its list of lines."""
    tables, current = [], []
    for line in text.split('\n') + ['']:
        if line.startswith('|'):
            current.append(line)
        elif current:
            tables.append(current)
            current = []
    return tables


NUMBER = r'[-−+]?\d[\d.,]*(e[-+]?\d+)?( ± [\d.]+)?[×%]?'


def _numbers(row):
    """The numbers of a Markdown table row's cells (``12.0 ± 1.5``, ``1.04×``, ``0.003``; a cell of
    several seeds, ``0.064 / 0.098``, gives each of its numbers)."""
    cells = [c.strip().strip('*') for c in row.strip().strip('|').split('|')]
    return [n for c in cells if re.fullmatch(rf'{NUMBER}( / {NUMBER})*', c) for n in c.split(' / ')]


def _in_order(numbers, source):
    """Whether ``numbers`` appear in ``source`` in the same order (other cells may lie between)."""
    remaining = iter(source)
    return all(n in remaining for n in numbers)


def test_pages_include_or_generate_source_tables_instead_of_copying_them():
    """A table row the analysis tools wrote (docs/evidence/*.md) or a generated block holds
    (paper tables, benchmarks, evidence summaries) appears in a page only inside a generated block
    or through a MyST ``include`` of the result file, never typed, not even some of its columns
    (three numbers or more of a source row, in order): a rerun or a changed source cannot leave an
    old copy behind."""
    sources = [row for path in glob.glob(osp.join(REPO, 'docs', 'evidence', '**', '*.md'),
                                         recursive=True)
               for table in _tables(path) for row in table[2:]]
    pages = [p for p in docs_tables.documents()
             if not p.startswith(osp.join(REPO, 'docs', 'evidence') + osp.sep)]
    for path in pages:
        with open(path, encoding='utf-8') as f:
            for block in docs_tables.BLOCK.finditer(f.read()):
                sources += [row for table in _tables_of(block.group('body')) for row in table[2:]]
    sources = {tuple(_numbers(row)) for row in sources}
    copied = {}
    for path in pages:
        with open(path, encoding='utf-8') as f:
            typed = docs_tables.BLOCK.sub('', f.read())
        rows = [row for table in _tables_of(typed) for row in table[2:]
                if len(_numbers(row)) >= 3
                and any(_in_order(_numbers(row), source) for source in sources)]
        if rows:
            copied[osp.relpath(path, REPO)] = rows
    assert copied == {}, 'rows typed by hand that a source holds (generate or include them instead)'
    page = open(osp.join(REPO, 'docs', 'evidence.md'), encoding='utf-8').read()
    includes = re.findall(r'```\{include\} (\S+)\n:start-after: (.+)\n', page)
    assert len(includes) >= 5
    for source, marker in includes:
        assert open(osp.join(REPO, 'docs', source), encoding='utf-8').read().count(marker) == 1


def _result_values(path, columns=None):
    """The numbers with a decimal point in the tables of a result file (of ``columns`` only, if
    given), each number of a several-seed cell on its own."""
    values = set()
    for table in _tables_of(read(path)):
        head = [c.strip() for c in table[0].strip().strip('|').split('|')]
        for row in table[2:]:
            cells = [c.strip() for c in row.strip().strip('|').split('|')]
            values |= {n for name, cell in zip(head, cells) if columns is None or name in columns
                       for n in _numbers(f'| {cell} |') if '.' in n}
    return values


def _typed(values, text):
    """Those of ``values`` that a text types outside its generated blocks."""
    return sorted(values & set(re.findall(r'\d+\.\d+', docs_tables.BLOCK.sub('', text))))


def test_single_stage_section_generates_its_tables_and_no_text_retypes_their_values():
    """Evidence §6's values live in docs/evidence/single_stage_heads.md (transcribed once: the runs'
    work directories are gone). Every table of the section is generated from that file, and neither
    the section's prose nor the texts that summarise it type one of its values (a value changed in
    the file cannot leave an old copy behind)."""
    values = _result_values('docs/evidence/single_stage_heads.md')
    assert len(values) > 100
    page = read('docs/evidence.md')
    section = page[page.index('## 6. '):page.index('## 7. ')]
    with open(docs_tables.EVIDENCE_TABLES, encoding='utf-8') as f:
        spec = yaml.safe_load(f)
    blocks = [m.group('name') for m in docs_tables.BLOCK.finditer(section)]
    assert len(blocks) >= 7
    for name in blocks:
        kind, _, summary = name.partition(':')
        assert kind == 'evidence', f'§6: {name} is not generated from a result file'
        assert {p['file'] for p in spec[summary]['parts']} == {'single_stage_heads.md'}, name
    assert _tables_of(docs_tables.BLOCK.sub('', section)) == [], '§6 holds a table typed by hand'
    for path, text in (('docs/evidence.md §6', section), ('docs/user_guide/per_call.md', None),
                       ('configs/cbn_single_stage/README.md', None), ('README.md', README)):
        typed = _typed(values, text or read(path))
        assert not typed, (f'{path} types values of docs/evidence/single_stage_heads.md: {typed} '
                           f'(point to the generated tables instead)')


@pytest.mark.parametrize('source, columns, page, block', [
    ('detection_analog_schedule.md', ('bbox AP', 'AP50'), 'docs/analysis.md',
     'evidence:detection-analog-schedule'),
    ('densenet_slices_lr005.md', None, 'docs/imagenet.md', 'evidence:densenet-slices')])
def test_transcribed_results_are_generated_and_no_page_retypes_them(source, columns, page, block):
    """Values transcribed into a result file (their runs are gone: the detection analog's schedule
    trials, the first per-slice DenseNet run) are generated into their page, and no page, nor the
    changelog, types them (of a ``mean ± std`` cell, each number)."""
    values = {v for n in _result_values(f'docs/evidence/{source}', columns)
              for v in re.findall(r'\d+\.\d+', n)}
    assert len(values) >= 6
    assert 'transcribed' in read(f'docs/evidence/{source}')
    assert block in [m.group('name') for m in docs_tables.BLOCK.finditer(read(page))]
    evidence = osp.join(REPO, 'docs', 'evidence') + osp.sep
    texts = ['CHANGELOG.md'] + [osp.relpath(p, REPO) for p in docs_tables.documents()
                                if not p.startswith(evidence)]
    typed = {path: _typed(values, read(path)) for path in texts}
    assert {path: v for path, v in typed.items() if v} == {}


def test_every_paper_reference_table_is_shown():
    """Each of the paper's tables that no run collects (``reference_tables`` of the paper results
    files, Table 8) is generated into a page, as the paper's."""
    shown = set()
    for path in docs_tables.documents():
        with open(path, encoding='utf-8') as f:
            shown |= {m.group('name').split(':', 1)[1] for m in docs_tables.BLOCK.finditer(f.read())
                      if m.group('name').startswith('paper:')}
    assert set(paper_results.REFERENCE_TABLES) <= shown
    for name in paper_results.REFERENCE_TABLES:
        assert "the paper's numbers, not measured here" in docs_tables.render(f'paper:{name}')


def test_a_number_changed_in_a_generated_block_is_caught():
    """Every generated block of every page is rendered from its source: a digit edited by hand in
    any of them makes the page differ from what tools/docs_tables.py writes."""
    checked = 0
    for path in docs_tables.documents():
        with open(path, encoding='utf-8') as f:
            blocks = list(docs_tables.BLOCK.finditer(f.read()))
        for block in blocks:
            body = block.group('body')
            digit = re.search(r'\d', body)
            assert digit, f'{osp.relpath(path, REPO)}: {block.group("name")} holds no number'
            edited = body[:digit.start()] + str((int(digit.group()) + 1) % 10) + body[digit.end():]
            assert docs_tables.render(block.group('name')) == body != edited
            checked += 1
    assert checked >= 50


def test_every_benchmark_measurement_is_shown_once():
    shown = []
    for path in docs_tables.documents():
        with open(path) as f:
            shown += [m.group('name').split(':', 1)[1] for m in docs_tables.BLOCK.finditer(f.read())
                      if m.group('name').startswith('benchmark:')]
    assert sorted(shown) == sorted(docs_tables.load_benchmarks()), \
        'each measurement of docs/data/benchmarks.yml appears in exactly one page'


def test_recorded_benchmark_commands_name_existing_tools_and_options():
    """Each command of docs/data/benchmarks.yml runs a script of tools/ with options it still has, so
    the cost page's commands can be rerun as printed."""
    for name, entry in docs_tables.load_benchmarks().items():
        commands = entry['command'] if isinstance(entry['command'], list) else [entry['command']]
        for command in commands:
            command = command.split('  #')[0]  # a trailing comment says what DIR is
            script = re.search(r'(?:\.venv/bin/)?python (tools/\S+\.py)(.*)$', command)
            assert script, f'{name}: {command!r} runs no script of tools/ with .venv/bin/python'
            source = read(script.group(1))
            options = set(re.findall(r"""['"](--[\w-]+)['"]""", source))
            unknown = set(re.findall(r'(?<!\S)(--[\w-]+)', script.group(2))) - options
            assert not unknown, f'{name}: {script.group(1)} has no option {sorted(unknown)}'


def test_every_evidence_summary_is_shown():
    with open(docs_tables.EVIDENCE_TABLES, encoding='utf-8') as f:
        defined = set(yaml.safe_load(f))
    shown = set()
    for path in docs_tables.documents():
        with open(path, encoding='utf-8') as f:
            shown |= {m.group('name').split(':', 1)[1] for m in docs_tables.BLOCK.finditer(f.read())
                      if m.group('name').startswith('evidence:')}
    assert shown == defined, 'each summary of docs/data/evidence_tables.yml is shown in a page'


def test_evidence_summary_refuses_a_column_or_row_its_source_lacks(tmp_path, monkeypatch):
    spec = {'no-column': dict(parts=[dict(file='batch_size_table.md', caption='Test accuracy')],
                              columns=['method', 'bs=3']),
            'no-row': dict(parts=[dict(file='batch_size_table.md', caption='Test accuracy')],
                           rows=['BN', 'LayerNorm']),
            'no-caption': dict(parts=[dict(file='batch_size_table.md', caption='No such table')]),
            'no-line': dict(quote=[dict(file='batch_size_table.md', line='No such line')]),
            'part-rows': dict(parts=[dict(file='batch_size_table.md', caption='Test accuracy',
                                          rows=['LayerNorm'])], rows=['BN'])}
    path = tmp_path / 'evidence_tables.yml'
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(docs_tables, 'EVIDENCE_TABLES', str(path))
    for name, error in (('no-column', 'no column'), ('no-row', '1 rows match'),
                        ('no-caption', 'no table after'), ('no-line', '0 lines start with'),
                        ('part-rows', '0 rows match')):  # a part's rows replace the summary's
        with pytest.raises(ValueError, match=error):
            docs_tables.render(f'evidence:{name}')


def test_evidence_summary_quotes_result_lines_and_takes_rows_per_part(tmp_path, monkeypatch):
    spec = {'two-parts': dict(parts=[dict(file='batch_size_table.md', caption='Test accuracy',
                                          rows=['BN'], label=['a']),
                                     dict(file='batch_size_table.md', caption='Test accuracy',
                                          rows=['GN'], label=['b'])],
                              label_columns=['part'], columns=['method', 'bs=16'],
                              quote=[dict(file='batch_size_table.md', line='Wall time')])}
    path = tmp_path / 'evidence_tables.yml'
    path.write_text(yaml.safe_dump(spec))
    monkeypatch.setattr(docs_tables, 'EVIDENCE_TABLES', str(path))
    lines = docs_tables.render('evidence:two-parts').split('\n')
    source = read('docs/evidence/batch_size_table.md').split('\n')
    assert lines[0] == '| part | method | bs=16 |'
    assert [line.split(' | ')[:2] for line in lines[2:4]] == [['| a', 'BN'], ['| b', 'GN']]
    assert lines[5] == '> ' + next(line for line in source if line.startswith('Wall time'))


def test_paper_reference_table_refuses_a_row_of_the_wrong_length_or_an_unknown_key(tmp_path):
    base = {'metrics': {'AP': ['coco/bbox_mAP', 'AP']}, 'tables': {}}
    for table, error in ((dict(title='t', columns=['a', 'b'], rows=[[1]]), '1 cells for 2 columns'),
                         (dict(title='t', columns=['a'], rows=[[1]], caption='x'), 'unknown keys')):
        path = tmp_path / 'paper_results.yml'
        path.write_text(yaml.safe_dump(dict(base, reference_tables={'table8': table})))
        with pytest.raises(ValueError, match=error):
            paper_results.read_benchmark('coco', str(path), 'configs/cbn_paper')


def test_generated_block_of_an_unknown_source_is_an_error():
    with pytest.raises(ValueError, match='unknown generated block'):
        docs_tables.regenerate('<!-- generated by tools/docs_tables.py: nothing:here -->\n'
                               '<!-- end of generated: nothing:here -->')


def test_documentation_site_builds_without_warnings(tmp_path):
    """Sphinx with warnings as errors: a broken cross-reference, a missing image, an unparseable
    docstring or a page outside the table of contents fails here (as `make docs` does)."""
    out = tmp_path / 'html'
    proc = subprocess.run([sys.executable, '-m', 'sphinx', '-W', '--keep-going', '-E', '-q', '-b',
                           'html', osp.join(REPO, 'docs'), str(out),
                           '-d', str(tmp_path / 'doctrees')],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f'sphinx-build failed:\n{(proc.stdout + proc.stderr)[-6000:]}'
    version = re.search(r"__version__ = '([^']+)'", read('cbn_mmdet/version.py')).group(1)
    index = (out / 'index.html').read_text()
    assert f'cbn_mmdet {version}' in index, 'the site shows the package version'
    api = (out / 'api.html').read_text()
    for name in ('CrossIterationBatchNorm2d', 'SyncCrossIterationBatchNorm2d', 'BatchRenorm2d',
                 'CBNBurnInHook', 'NormSwitchHook', 'convert_to_cbn'):
        assert f'id="cbn_mmdet.' in api and name in api, f'the API reference documents no {name}'
    # the maths is typeset offline, from the copy of MathJax in docs/_static
    assert (out / '_static' / 'mathjax' / 'tex-svg.js').is_file()
    assert 'cdn.jsdelivr' not in (out / 'user_guide' / 'layer.html').read_text()
