"""The step benchmark runs in-process and prints one valid JSON line per case."""

import json

import pytest

from landscape_jax import bench

REQUIRED_KEYS = {
    'model',
    'batch_size',
    'anchors',
    'step_ms',
    'images_per_s',
    'cpu_ms',
    'device',
    'compiler_options',
}

# A tiny case: one compilation serves both counts (each has one anchor slot).
TINY_ARGS = [
    '--model=resnet32',
    '--image_size=8',
    '--channels=1',
    '--num_classes=4',
    '--batch_size=4',
    '--steps=2',
    '--warmup=0',
    '--repeats=1',
    '--anchors=0,1',
    '--study_ratio',
]


def test_prints_json_lines_with_the_required_keys(capsys):
    bench.main(TINY_ARGS)

    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3
    results = [json.loads(line) for line in lines[:2]]
    for result, anchors in zip(results, (0, 1), strict=True):
        assert result.keys() >= REQUIRED_KEYS
        assert result['anchors'] == anchors
        assert result['model'] == 'resnet32'
        assert result['batch_size'] == 4
        assert result['step_ms'] > 0
        assert result['images_per_s'] > 0
    assert 'overhead_per_anchor_pct' not in results[0]
    assert isinstance(results[1]['overhead_per_anchor_pct'], float)

    ratios = json.loads(lines[2])
    assert ratios['model'] == 'resnet32'
    measured = ratios['study_ratio']['1']['measured']
    expected = results[1]['step_ms'] / results[0]['step_ms']
    assert measured == pytest.approx(expected, abs=1e-3)
    assert ratios['study_ratio']['1']['study'] == [pytest.approx(63 / 55, abs=1e-3)] * 2


def test_members_compares_a_sweep_with_sequential_runs(capsys):
    bench.main(
        [
            '--model=resnet8',
            '--image_size=8',
            '--channels=1',
            '--num_classes=4',
            '--batch_size=4',
            '--steps=2',
            '--warmup=0',
            '--repeats=1',
            '--members=2',
        ]
    )

    (line,) = capsys.readouterr().out.strip().splitlines()
    result = json.loads(line)
    assert result['members'] == 2
    assert result['sweep_step_ms'] > 0
    assert result['sequential_step_ms'] == pytest.approx(
        2 * result['single_step_ms'], abs=2e-3
    )
    assert result['sweep_speedup'] == pytest.approx(
        result['sequential_step_ms'] / result['sweep_step_ms'], rel=1e-2
    )


def test_study_ratios_of_mobilenetv2_are_ranges():
    results = [
        {'model': 'mobilenetv2', 'anchors': count, 'step_ms': 10.0 + count}
        for count in (0, 3, 5)
    ]
    ratios = bench.study_ratios(results)['study_ratio']
    assert ratios['3']['measured'] == pytest.approx(1.3)
    assert ratios['3']['study'] == [pytest.approx(134 / 72, abs=1e-3)] + [
        pytest.approx(138 / 72, abs=1e-3)
    ]
    assert ratios['5']['study'] is None


@pytest.mark.parametrize(
    ('argument', 'message'),
    [
        ('--anchors=1,3', 'must include 0'),
        ('--anchors=0,x', 'comma-separated integers'),
        ('--anchors=0,0', 'distinct'),
        ('--steps=0', 'steps and repeats'),
        ('--members=1', 'members must be at least 2'),
    ],
)
def test_bad_arguments_exit_with_status_2(argument, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(['--batch_size=4', argument])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
