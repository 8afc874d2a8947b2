""" scripts/extract_features.py, scripts/visualize_sampling.py, dgmn_timm.tools.visualize, and what every script
shares (dgmn_timm.tools.engine): argument errors, the no-overwrite rule, help texts, thread defaults. """
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import timm
from timm.data import create_transform, resolve_data_config

import dgmn_timm  # noqa: F401
from utils import load_script
from timm.utils import random_seed as seed_everything
from dgmn_timm.errors import DataDirError
from dgmn_timm.tools.data import list_images
from dgmn_timm.weights.checkpoints import CheckpointError
from dgmn_timm.tools.cli import UsageError
from dgmn_timm.tools.engine import save_safetensors
from dgmn_timm.tools.visualize import image_to_stage, sampling_points, sampling_points_many, stage_to_image

ROOT = Path(__file__).resolve().parents[1]


extract = load_script('extract_features')
visualize_script = load_script('visualize_sampling')

FAST = ['--model', 'dgmn2_tiny', '--img-size', '32', '--workers', '0', '--no-progress']


@pytest.fixture(scope='module')
def weights(tmp_path_factory):
    """ A random dgmn2_tiny saved as a checkpoint (with non-zero offsets), and the model itself. """
    seed_everything(0)
    model = timm.create_model('dgmn2_tiny', num_classes=7).eval()
    with torch.no_grad():
        for m in model.modules():
            if hasattr(m, 'walk') and isinstance(m.walk, torch.nn.Linear):
                m.walk.weight.normal_(0, 0.05)
    path = str(tmp_path_factory.mktemp('weights') / 'random.safetensors')
    save_safetensors(model.state_dict(), path)
    return path, model


@pytest.fixture(scope='module')
def image_folder(tmp_path_factory):
    """ 7 images of varied sizes in nested folders; names chosen so that natural order != plain sort. """
    root = tmp_path_factory.mktemp('images')
    rng = np.random.default_rng(0)
    rels = ['a/img2.png', 'a/img10.png', 'a/deeper/z.jpg', 'b/1.png', 'b/x.jpeg', 'c.png', 'img1.webp']
    for i, rel in enumerate(rels):
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        h, w = 40 + 9 * i, 70 - 5 * i
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    (root / 'notes.txt').write_text('not an image')
    return str(root)


def reference(model, paths, levels=None, maps=False):
    """ Features computed directly, one image at a time. """
    cfg = resolve_data_config(dict(img_size=32), model=model)
    tf = create_transform(**cfg)
    out = []
    with torch.no_grad():
        for p in paths:
            x = tf(Image.open(p).convert('RGB')).unsqueeze(0)
            if levels is None:
                out.append(model.forward_head(model.forward_features(x), pre_logits=True)[0])
            else:
                feats = model.forward_intermediates(x, indices=levels, intermediates_only=True)
                out.append([f[0] if maps else f[0].mean((-2, -1)) for f in feats])
    return out


def test_list_images_order(image_folder):
    paths = [os.path.relpath(p, image_folder) for p in list_images(image_folder)]
    assert paths == ['a/deeper/z.jpg', 'a/img2.png', 'a/img10.png', 'b/1.png', 'b/x.jpeg', 'c.png', 'img1.webp']


def test_extract_pooled_embedding(image_folder, weights, tmp_path):
    ckpt, model = weights
    out = str(tmp_path / 'feats.safetensors')
    result = extract.main([image_folder, '--output', out, '--checkpoint', ckpt, '--batch-size', '3'] + FAST)
    from safetensors import safe_open
    with safe_open(out, framework='pt') as f:
        feats = f.get_tensor('features')
        meta = f.metadata()
    paths = list_images(image_folder)
    assert feats.shape == (7, 512)
    assert json.loads(meta['paths']) == paths
    with open(tmp_path / 'feats.json', encoding='utf-8') as f:
        sidecar = json.load(f)
    assert sidecar['paths'] == paths and sidecar['skipped'] == [] and result['paths'] == paths
    ref = torch.stack(reference(model, paths))
    torch.testing.assert_close(feats, ref, atol=1e-4, rtol=1e-4)
    assert not os.path.exists(out + '.parts')


def test_extract_levels_pooled_and_maps(image_folder, weights, tmp_path):
    ckpt, model = weights
    paths = list_images(image_folder)
    out = str(tmp_path / 'pyr.safetensors')
    extract.main([image_folder, '--output', out, '--checkpoint', ckpt, '--levels', '3,0,1,2'] + FAST)
    from safetensors.torch import load_file
    feats = load_file(out)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        'level0': (7, 64), 'level1': (7, 128), 'level2': (7, 320), 'level3': (7, 512)}
    ref = reference(model, paths, levels=[0, 1, 2, 3])
    for lv in range(4):
        torch.testing.assert_close(feats[f'level{lv}'], torch.stack([r[lv] for r in ref]), atol=1e-4, rtol=1e-4)

    out = str(tmp_path / 'maps.safetensors')
    extract.main([image_folder, '--output', out, '--checkpoint', ckpt, '--levels', '1,3', '--maps'] + FAST)
    feats = load_file(out)
    assert {k: tuple(v.shape) for k, v in feats.items()} == {'level1': (7, 128, 4, 4), 'level3': (7, 512, 1, 1)}
    ref = reference(model, paths, levels=[1, 3], maps=True)
    torch.testing.assert_close(feats['level1'], torch.stack([r[0] for r in ref]), atol=1e-4, rtol=1e-4)

    out = str(tmp_path / 'unpooled.safetensors')
    extract.main([image_folder, '--output', out, '--checkpoint', ckpt, '--maps'] + FAST)
    assert tuple(load_file(out)['features'].shape) == (7, 512, 1, 1)  # forward_features, unpooled


def test_extract_list_file_npy_and_unreadable(image_folder, weights, tmp_path):
    ckpt, model = weights
    paths = list_images(image_folder)[::-1]  # the list's order, not the folder's
    broken = tmp_path / 'broken.png'
    broken.write_bytes(b'not a png')
    listing = tmp_path / 'list.txt'
    lines = ['# comment', os.path.relpath(paths[0], tmp_path), str(broken), ''] + paths[1:]
    listing.write_text('\n'.join(lines))
    out = str(tmp_path / 'feats.npy')
    extract.main([str(listing), '--output', out, '--checkpoint', ckpt, '--batch-size', '2',
                  '--chunk-size', '3'] + FAST)
    feats = np.load(out)
    assert feats.shape == (7, 512)
    with open(tmp_path / 'feats.json', encoding='utf-8') as f:
        sidecar = json.load(f)
    assert [os.path.abspath(p) for p in sidecar['paths']] == [os.path.abspath(p) for p in paths]
    assert sidecar['skipped'] == [str(broken)]
    ref = torch.stack(reference(model, paths)).numpy()
    np.testing.assert_allclose(feats, ref, atol=1e-4, rtol=1e-4)

    out = str(tmp_path / 'lv.npy')
    extract.main([str(listing), '--output', out, '--checkpoint', ckpt, '--levels', '0,2'] + FAST)
    assert np.load(tmp_path / 'lv.level0.npy').shape == (7, 64)
    assert np.load(tmp_path / 'lv.level2.npy').shape == (7, 320)


def test_extract_continues_after_interruption(image_folder, weights, tmp_path, monkeypatch):
    ckpt, _ = weights
    out = str(tmp_path / 'feats.safetensors')
    args = [image_folder, '--output', out, '--checkpoint', ckpt, '--batch-size', '2', '--chunk-size', '2'] + FAST
    original = extract.compute_features
    calls = []

    def failing(model, x, *a, **kw):
        calls.append(x.shape[0])
        if len(calls) == 3:
            raise KeyboardInterrupt  # interrupted in the third chunk
        return original(model, x, *a, **kw)

    monkeypatch.setattr(extract, 'compute_features', failing)
    with pytest.raises(KeyboardInterrupt):
        extract.main(args)
    assert sorted(os.listdir(out + '.parts')) == ['chunk_000000.safetensors', 'chunk_000001.safetensors',
                                                  'config.json']
    calls.clear()
    monkeypatch.setattr(extract, 'compute_features', lambda *a, **kw: (calls.append(a[1].shape[0]),
                                                                       original(*a, **kw))[1])
    with pytest.raises(UsageError, match='--resume'):  # the unfinished extraction is not touched without it
        extract.main(args)
    extract.main(args + ['--resume'])
    assert calls == [2, 1]  # only chunks 2 and 3 (images 5-7) were computed again
    monkeypatch.setattr(extract, 'compute_features', original)
    from safetensors.torch import load_file
    resumed = load_file(out)['features']
    extract.main(args[:2] + [str(tmp_path / 'again.safetensors')] + args[3:])
    torch.testing.assert_close(resumed, load_file(str(tmp_path / 'again.safetensors'))['features'])


def test_extract_errors(tmp_path, weights):
    ckpt, _ = weights
    with pytest.raises(DataDirError, match='neither a folder'):
        extract.main([str(tmp_path / 'nothing'), '--output', str(tmp_path / 'f.safetensors')] + FAST)
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DataDirError, match='No images under'):
        extract.main([str(tmp_path / 'empty'), '--output', str(tmp_path / 'f.safetensors')] + FAST)
    img = tmp_path / 'one.png'
    Image.new('RGB', (40, 40)).save(img)
    with pytest.raises(UsageError, match='must end in'):
        extract.main([str(img), '--output', str(tmp_path / 'f.pt')] + FAST)
    with pytest.raises(UsageError, match='out of range'):
        extract.main([str(img), '--output', str(tmp_path / 'f.npy'), '--levels', '4'] + FAST)
    with pytest.raises(CheckpointError, match='does not exist'):
        extract.main([str(img), '--output', str(tmp_path / 'f.npy'), '--checkpoint', str(tmp_path / 'x.pth')] + FAST)
    assert sorted(os.listdir(tmp_path)) == ['empty', 'one.png']  # nothing written


@pytest.mark.slow
def test_extract_torchrun_matches_single_process(image_folder, weights, tmp_path):
    """ 2 processes (gloo) share the chunks out; the merged result equals a single-process run. """
    import subprocess
    import sys
    ckpt, _ = weights
    args = ['--checkpoint', ckpt, '--chunk-size', '2', '--levels', '1,3'] + FAST
    env = dict(os.environ, OMP_NUM_THREADS='1')
    ddp = str(tmp_path / 'ddp.safetensors')
    proc = subprocess.run(
        [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
         str(ROOT / 'scripts' / 'extract_features.py'), image_folder, '--output', ddp] + args,
        capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    single = str(tmp_path / 'single.safetensors')
    extract.main([image_folder, '--output', single] + args)
    from safetensors import safe_open
    with safe_open(ddp, 'pt') as a, safe_open(single, 'pt') as b:
        assert a.metadata()['paths'] == b.metadata()['paths']
        for k in ('level1', 'level3'):
            torch.testing.assert_close(a.get_tensor(k), b.get_tensor(k))


# ------------------------------------------------------------------------------------------
# visualisation


def _zero_offset_model():
    seed_everything(0)
    return timm.create_model('dgmn2_tiny', num_classes=0).eval()  # offsets start at zero


def test_sampling_points_zero_offsets_are_the_3x3_neighbourhood():
    model = _zero_offset_model()
    x = torch.randn(3, 64, 96)
    point = (30.0, 50.0)
    result = sampling_points(model, x, point)
    assert [r['stride'] for r in result] == [4, 8, 16, 32]
    grid = np.stack(np.meshgrid([-1, 0, 1], [-1, 0, 1], indexing='ij'), -1).reshape(9, 2)
    for r, heads in zip(result, (1, 2, 5, 8)):
        s = r['stride']
        qy, qx = r['query']
        assert (qy, qx) == (image_to_stage(30.0, s, 64 // s), image_to_stage(50.0, s, 96 // s))
        expected = (np.array([qy, qx]) + grid + 0.5) * s - 0.5
        assert r['positions'].shape == (heads, 9, 2) and r['weights'].shape == (heads, 9)
        np.testing.assert_allclose(r['positions'], np.broadcast_to(expected, (heads, 9, 2)), atol=1e-5)
        np.testing.assert_allclose(r['weights'].sum(-1), 1., atol=1e-5)
        assert (r['weights'] > 0).all()
        # the query's own node (k = 4) sits on the query's pixel centre, within half a stride of the point
        assert np.abs(r['positions'][0, 4] - np.array(point)).max() <= s / 2
    assert stage_to_image(0, 4) == 1.5 and image_to_stage(1.5, 4, 10) == 0


def test_sampling_points_follow_the_offsets():
    model = _zero_offset_model()
    x = torch.randn(1, 3, 64, 64)
    points = [(10.0, 20.0), (40.0, 33.0)]
    before = sampling_points_many(model, x, points)
    attn = model.stages[1].blocks[-1].attn
    with torch.no_grad():
        attn.walk.bias[0::2] = 1.0  # every node walks one stage-2 pixel down
        attn.walk.bias[1::2] = -0.5  # and half a pixel left
    after = sampling_points_many(model, x, points)
    for b, a in zip(before, after):
        np.testing.assert_allclose(a[1]['positions'][..., 0], b[1]['positions'][..., 0] + 8, atol=1e-5)
        np.testing.assert_allclose(a[1]['positions'][..., 1], b[1]['positions'][..., 1] - 4, atol=1e-5)
        for s in (0, 2, 3):  # other stages keep their (zero-offset) positions
            np.testing.assert_allclose(a[s]['positions'], b[s]['positions'], atol=1e-5)
        assert not np.allclose(a[1]['weights'], b[1]['weights'])
    with torch.no_grad():
        model.stages[3].blocks[-1].attn.walk.weight.normal_(0, 0.5)  # input-dependent walks
    moved = sampling_points(model, x[0], points[0])[3]['positions']
    assert np.abs(moved - after[0][3]['positions']).max() > 0.5


def test_sampling_points_rejects_other_models():
    with pytest.raises(TypeError, match='DGMN2'):
        sampling_points(timm.create_model('resnet18', num_classes=0), torch.randn(3, 64, 64), (5, 5))


def test_visualize_script_writes_png_that_follows_offsets(weights, tmp_path):
    ckpt, model = weights
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    common = ['--image', str(img), '--model', 'dgmn2_tiny', '--img-size', '64', '--point', '40,70']
    a_png, a_json = str(tmp_path / 'a.png'), str(tmp_path / 'a.json')
    report = visualize_script.main(common + ['--checkpoint', ckpt, '--output', a_png, '--save-points', a_json])
    with Image.open(a_png) as im:
        assert im.format == 'PNG' and im.width > 400 and im.height > 100
    assert len(report['points']) == 1 and len(report['points'][0]['stages']) == 4
    assert report['input_size'] == [64, 85]  # shorter side 64, aspect kept, no crop

    # perturb the offsets: the drawn points move, the PNG changes
    with torch.no_grad():
        for stage in model.stages:
            stage.blocks[-1].attn.walk.bias.add_(torch.linspace(-2, 2, 18))
    moved_ckpt = str(tmp_path / 'moved.safetensors')
    save_safetensors(model.state_dict(), moved_ckpt)
    b_png, b_json = str(tmp_path / 'b.png'), str(tmp_path / 'b.json')
    visualize_script.main(common + ['--checkpoint', moved_ckpt, '--output', b_png, '--save-points', b_json])
    with open(a_json) as f:
        pa = json.load(f)
    with open(b_json) as f:
        pb = json.load(f)
    for sa, sb in zip(pa['points'][0]['stages'], pb['points'][0]['stages']):
        assert np.abs(np.array(sa['positions']) - np.array(sb['positions'])).max() > 1.0
    assert np.asarray(Image.open(a_png).convert('RGB')).tobytes() != np.asarray(
        Image.open(b_png).convert('RGB')).tobytes()

    # a grid of queries, random weights, the bundled sample image
    report = visualize_script.main(['--grid', '3', '--img-size', '64', '--stages', '2,4',
                                    '--output', str(tmp_path / 'grid.png')])
    assert len(report['points']) == 9 and os.path.getsize(tmp_path / 'grid.png') > 0
    assert [s['stage'] for s in report['points'][0]['stages']] == [2, 4]


def test_sampling_points_rejects_points_outside_the_image():
    model = _zero_offset_model()
    x = torch.randn(3, 40, 64)
    sampling_points(model, x, (-0.5, 63.5))  # the outer pixel edges are inside
    for point in [(40.0, 10.0), (-0.6, 10.0), (10.0, 63.6), (10.0, -3.0)]:
        with pytest.raises(ValueError, match='outside the 40x64 image'):
            sampling_points(model, x, point)
    with pytest.raises(ValueError, match='outside'):
        sampling_points_many(model, x, [(1.0, 1.0), (100.0, 1.0)])


def test_visualize_script_errors(tmp_path):
    img = tmp_path / 'photo.png'
    Image.new('RGB', (50, 40)).save(img)
    out = str(tmp_path / 'o.png')
    with pytest.raises(UsageError, match='outside'):
        visualize_script.main(['--image', str(img), '--point', '45,10', '--img-size', '32', '--output', out])
    with pytest.raises(UsageError, match='y,x'):
        visualize_script.main(['--image', str(img), '--point', '12', '--output', out])
    with pytest.raises(UsageError, match='does not exist'):
        visualize_script.main(['--image', str(tmp_path / 'none.png'), '--output', out])
    with pytest.raises(UsageError, match='stages 1..4'):
        visualize_script.main(['--image', str(img), '--stages', '0,2', '--output', out])
    with pytest.raises(UsageError, match='resnet50_dgmn_c5 does not have'):
        visualize_script.main(['--image', str(img), '--model', 'resnet50_dgmn_c5', '--output', out])
    assert sorted(os.listdir(tmp_path)) == ['photo.png']  # nothing written


def test_visualize_script_replaces_files_only_with_overwrite(tmp_path):
    png, js = tmp_path / 'v.png', tmp_path / 'v.json'
    args = ['--img-size', '32', '--output', str(png), '--save-points', str(js), '--threads', '1']
    visualize_script.main(args)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    for existing in ([], ['--output', str(tmp_path / 'other.png')]):  # either file blocks the run
        with pytest.raises(UsageError, match='already exist.*--overwrite'):
            visualize_script.main(args + existing)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    report = visualize_script.main(args + ['--overwrite', '--point', '10,10'])
    assert report['points'][0]['point'] == [10.0, 10.0]
    assert json.loads(js.read_text())['points'][0]['point'] == [10.0, 10.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ['v.json', 'v.png']


def test_visualize_script_repgraph_layers_match_the_models():
    """ The script's table of RepGraph ResNets and their layers is the registered models' (built on meta). """
    from dgmn_timm.layers import RepGraph
    assert set(visualize_script.REPGRAPH_LAYERS) == set(timm.list_models('*repgraph*'))
    for name, where in visualize_script.REPGRAPH_LAYERS.items():
        model = timm.create_model(name, device='meta', num_classes=0)
        names = [n for n, m in model.named_modules() if isinstance(m, RepGraph)]
        assert tuple(f'res{int(n.split(".")[0][len("layer"):]) + 1}' for n in names) == where, name


def test_visualize_script_draws_repgraph_nodes(tmp_path):
    """ RepGraph ResNets: a PNG of one layer's S nodes per query; JSON positions in image pixels. """
    from dgmn_timm.layers import RepGraph
    img = tmp_path / 'photo.png'
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (90, 120, 3), dtype=np.uint8)).save(img)
    common = ['--image', str(img), '--img-size', '64']

    # random weights: the offsets are small, so the 9 nodes sit near the query, with near-uniform weights
    png, js = str(tmp_path / 'r.png'), str(tmp_path / 'r.json')
    report = visualize_script.main(common + ['--model', 'resnet50_repgraph', '--point', '40,70', '--output', png,
                                             '--save-points', js])
    with Image.open(png) as im:
        assert im.format == 'PNG' and im.width > 200 and im.height > 150
    with open(js) as f:
        assert json.load(f) == json.loads(json.dumps(report))
    assert report['input_size'] == [64, 85]
    layer = report['layer']
    assert (layer['index'], layer['num_layers'], layer['stage'], layer['module']) == (1, 1, 'res4', 'layer3.5.context')
    assert layer['map_size'] == [4, 6]
    np.testing.assert_allclose(layer['stride'], [90 / 4, 120 / 6])
    (entry,) = report['points']
    pos, wts = np.array(entry['positions']), np.array(entry['weights'])
    assert pos.shape == (9, 2) and wts.shape == (9,)
    np.testing.assert_allclose(wts.sum(), 1., atol=1e-5)
    np.testing.assert_allclose(wts, 1 / 9, atol=1e-2)
    qpx = np.array(entry['query_px'])
    assert np.abs(qpx - np.array([40., 70.])).max() <= np.max(layer['stride']) / 2  # the point's map cell
    assert np.abs(pos - qpx).max() < 0.5 * np.min(layer['stride'])  # each node within half a map pixel

    # zero offsets put every node on the query; an offset bias moves them all by that many map pixels
    seed_everything(0)
    model = timm.create_model('resnet50_repgraph_3l', num_classes=0)
    layers = [m for m in model.modules() if isinstance(m, RepGraph)]
    with torch.no_grad():
        for m in layers:
            m.offset.weight.zero_()
            m.offset.bias.zero_()
        layers[1].offset.bias[0::2] = 1.0  # dy: one res4 pixel down
        layers[1].offset.bias[1::2] = -0.5  # dx: half a pixel left
    ckpt = str(tmp_path / 'moved.safetensors')
    save_safetensors(model.state_dict(), ckpt)
    for index, shift in ((1, (0., 0.)), (2, (1.0, -0.5))):
        report = visualize_script.main(common + ['--model', 'resnet50_repgraph_3l', '--checkpoint', ckpt,
                                                 '--layer', str(index), '--grid', '2',
                                                 '--output', str(tmp_path / f'l{index}.png')])
        layer = report['layer']
        assert layer['index'] == index and layer['stage'] == ('res3', 'res4')[index - 1]
        assert len(report['points']) == 4
        for entry in report['points']:
            expect = np.array(entry['query_px']) + np.array(shift) * np.array(layer['stride'])
            np.testing.assert_allclose(entry['positions'], np.broadcast_to(expect, (9, 2)), atol=1e-3)
            np.testing.assert_allclose(entry['weights'], 1 / 9, atol=1e-6)  # nine copies of one key
    assert os.path.getsize(tmp_path / 'l1.png') > 0 and os.path.getsize(tmp_path / 'l2.png') > 0


# ------------------------------------------------------------------------------------------
# every script: one error line per mistake, before any model is built, nothing written


SCRIPTS = {name: load_script(name) for name in ('finetune', 'extract_features', 'visualize_sampling',
                                                'train_detection', 'train_segmentation')}


@pytest.fixture(scope='module')
def bad_inputs(tmp_path_factory):
    """ A folder of small inputs: a tiny ImageFolder tree, COCO json, image / mask pairs and bad files. """
    root = tmp_path_factory.mktemp('bad_inputs')
    for rel in ('tree/train/a/1.png', 'tree/val/a/1.png', 'pairs/img/1.png', 'coco/1.png'):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.new('RGB', (32, 32)).save(root / rel)
    (root / 'pairs/mask').mkdir()
    Image.new('L', (32, 32)).save(root / 'pairs/mask/1.png')
    (root / 'coco/ann.json').write_text(json.dumps(dict(
        images=[dict(id=1, file_name='1.png', height=32, width=32)], categories=[dict(id=1, name='thing')],
        annotations=[dict(id=1, image_id=1, category_id=1, bbox=[2, 2, 20, 20], area=400, iscrowd=0)])))
    (root / 'notes.txt').write_text('not an image')
    (root / 'bad.pth').write_text('a text file renamed .pth')
    (root / 'prev').mkdir()
    (root / 'prev' / 'train_state.pt').write_bytes(b'PK\x03\x04 truncated')
    (root / 'prev' / 'metrics.jsonl').write_text('')
    return root


def _cases():
    ft = ['finetune', '--data-dir', '{r}/tree', '--output-dir', '{out}', '--img-size', '32']
    seg = ['train_segmentation', '--train-images', '{r}/pairs/img', '--train-masks', '{r}/pairs/mask',
           '--num-classes', '2', '--output-dir', '{out}']
    det = ['train_detection', '--train-images', '{r}/coco', '--train-ann', '{r}/coco/ann.json', '--output-dir', '{out}']
    ex = ['extract_features', '{r}/tree', '--output', '{out}/f.safetensors']
    return [
        (ft + ['--batch-size', '0'], '--batch-size must be at least 1'),
        (ft + ['--epochs', '0'], '--epochs must be at least 1'),
        (ft + ['--model', 'dgmn2_tinny'], "unknown model 'dgmn2_tinny'; did you mean dgmn2_tiny"),
        (ft + ['--checkpoint', '{r}/bad.pth'], 'bad.pth is not a weights file'),
        (ft + ['--checkpoint', '{r}/missing.pth'], 'missing.pth does not exist'),
        (ft + ['--pretrained', '--checkpoint', '{r}/bad.pth'], 'not both'),
        (ft[:2] + ['{r}/nothing'] + ft[3:], 'Data directory .*nothing does not exist'),
        (ft[:4] + ['{r}/prev'] + ft[5:], r'prev holds a previous run .*--resume.*--overwrite'),
        (ft[:4] + ['{r}/prev'] + ft[5:] + ['--resume'], 'cannot read the training state .*truncated'),
        (ft + ['--resume'], 'no training state to resume from'),
        (ft + ['--resume', '--overwrite'], 'not both'),
        (ex + ['--batch-size', '0'], '--batch-size must be at least 1'),
        (ex[:1] + ['{r}/nothing'] + ex[2:], 'neither a folder of images nor a list file'),
        (ex[:-1] + ['{out}/f.pt'], 'must end in .safetensors or .npy'),
        (ex + ['--checkpoint', '{r}/bad.pth'], 'bad.pth is not a weights file'),
        (ex + ['--levels', 'a,b'], 'comma-separated integers'),
        (ex + ['--resume'], 'no unfinished extraction'),
        (ex + ['--img-size', '8'], '--img-size 8: dgmn2_tiny takes inputs of at least 32 pixels'),
        (ex + ['--crop-pct', '1.5'], r'--crop-pct must be in \(0, 1\]'),
        (seg + ['--num-classes', '0'], '--num-classes must be at least 1'),
        (seg + ['--batch-size', '0'], '--batch-size must be at least 1'),
        (seg[:4] + ['{r}/nothing'] + seg[5:], 'mask folder .*nothing does not exist'),
        (seg + ['--checkpoint', '{r}/bad.pth'], 'bad.pth is not a weights file'),
        (seg + ['--backbone', 'nope_net'], "unknown model 'nope_net'"),
        (seg + ['--device', 'tpu:9'], "unknown --device 'tpu:9'"),
        (seg[:-1] + ['{r}/prev', '--resume'], 'cannot read the training state .*truncated'),
        (seg + ['--resume'], 'no training state to resume from'),
        (det[:2] + ['{r}/nothing'] + det[3:], 'training image folder .*nothing does not exist'),
        (det[:4] + ['{r}/coco/missing.json'] + det[5:], 'annotation file .*missing.json does not exist'),
        (det[:4] + ['{r}/notes.txt'] + det[5:], 'notes.txt is not a COCO-format annotation file'),
        (det + ['--checkpoint', '{r}/bad.pth'], 'bad.pth is not a weights file'),
        (det + ['--epochs', '0'], '--epochs must be at least 1'),
        (det[:-1] + ['{r}/prev', '--resume'], 'cannot read the training state .*truncated'),
        (['visualize_sampling', '--image', '{r}/notes.txt', '--output', '{out}/v.png'], 'cannot read image'),
        (['visualize_sampling', '--model', 'resnet50_dgmn_c5', '--output', '{out}/v.png'], 'does not have'),
        (['visualize_sampling', '--model', 'resnet50_nonlocal', '--output', '{out}/v.png'],
         'resnet50_nonlocal does not have; use one of .*resnet50_repgraph'),
        (['visualize_sampling', '--model', 'resnet50_repgraph', '--layer', '2', '--output', '{out}/v.png'],
         r'--layer 2: resnet50_repgraph has RepGraph layers 1..1 \(res4\)'),
        (['visualize_sampling', '--model', 'resnet50_repgraph_5l', '--layer', '0', '--output', '{out}/v.png'],
         'layers 1..5'),
        (['visualize_sampling', '--model', 'resnet50_repgraph', '--stages', '3', '--output', '{out}/v.png'],
         '--stages is for DGMN2 models'),
        (['visualize_sampling', '--layer', '1', '--output', '{out}/v.png'], '--layer is for RepGraph models'),
        (['visualize_sampling', '--img-size', '8', '--output', '{out}/v.png'],
         '--img-size 8: dgmn2_tiny takes inputs of at least 32 pixels'),
        (['visualize_sampling', '--output', '{r}/coco/1.png'], r'1.png already exist.*--overwrite'),
        (['visualize_sampling', '--output', '{out}/v.png', '--save-points', '{r}/coco/ann.json'],
         r'ann.json already exist.*--overwrite'),
        (['visualize_sampling', '--output', '{out}/v.jpg'], '--output must end in .png'),
        (['visualize_sampling', '--output', '{out}/v.png', '--threads', '0'], '--threads must be at least 1'),
    ]


@pytest.mark.parametrize('argv, message', _cases(), ids=lambda v: ' '.join(v[:1] + v[-2:]) if isinstance(v, list)
                         else None)
def test_script_argument_errors(argv, message, bad_inputs, tmp_path, monkeypatch, capsys):
    """ exit code 2, one 'error:' line naming the mistake, no model built, nothing written. """
    from dgmn_timm.tools.cli import run_cli

    def no_model(*args, **kwargs):
        raise AssertionError('a model was built before the arguments were checked')

    monkeypatch.setattr(timm, 'create_model', no_model)
    out = tmp_path / 'out'
    before = {p: p.read_bytes() for p in bad_inputs.rglob('*') if p.is_file()}
    name, *args = [a.format(r=bad_inputs, out=out) for a in argv]
    assert run_cli(SCRIPTS[name].main, args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith('error: '), err
    import re
    assert re.search(message, err[0]), err[0]
    assert not out.exists()
    assert {p: p.read_bytes() for p in bad_inputs.rglob('*') if p.is_file()} == before


def test_quick_start_cli_errors(tmp_path):
    """ ``python -m dgmn_timm``: a missing image is one error line and exit code 2, in a fresh process. """
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, '-m', 'dgmn_timm', '--image', str(tmp_path / 'none.jpg')],
                          capture_output=True, text=True, timeout=300, env=dict(os.environ, OMP_NUM_THREADS='1'))
    assert proc.returncode == 2
    assert proc.stderr.strip() == f'error: image {tmp_path / "none.jpg"} does not exist'


@pytest.mark.parametrize('argv, message', [
    (['--image', '{r}/missing.png'], 'missing.png does not exist'),
    (['--image', '{r}/notes.txt'], 'cannot read image'),
    (['--model', 'dgmn3_tiny'], "unknown model 'dgmn3_tiny'"),
    (['--checkpoint', '{r}/bad.pth'], 'bad.pth is not a weights file'),
])
def test_quick_start_argument_errors(argv, message, bad_inputs, monkeypatch, capsys):
    from dgmn_timm.__main__ import main
    from dgmn_timm.tools.cli import run_cli
    monkeypatch.setattr(timm, 'create_model', lambda *a, **kw: pytest.fail('model built before the checks'))
    assert run_cli(main, [a.format(r=bad_inputs) for a in argv]) == 2
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert line.startswith('error: ') and message in line


@pytest.mark.parametrize('name, argv', [
    ('finetune', ['--data-dir', 'd', '--output', 'o']),
    ('finetune', ['--data-dir', 'd', '--num-threads', '3']),
    ('train_segmentation', ['--train-images', 'i', '--train-masks', 'm', '--num-classes', '3', '--weights', 'w']),
])
def test_no_alias_spellings(name, argv, capsys):
    """ One spelling per option: the former aliases are unknown options. """
    with pytest.raises(SystemExit) as e:
        SCRIPTS[name].build_parser().parse_args(argv)
    assert e.value.code == 2 and 'unrecognized arguments' in capsys.readouterr().err


def test_segmentation_recipe_follows_the_head(monkeypatch):
    """ HEAD_DEFAULTS of the chosen head fill every option not given on the command line. """
    from dgmn_timm.tasks import segmentation
    seg = SCRIPTS['train_segmentation']
    monkeypatch.setitem(segmentation.HEADS, 'toy', segmentation.HEADS['fcn'])
    monkeypatch.setitem(segmentation.HEAD_DEFAULTS, 'toy', dict(opt='sgd', lr=0.01, momentum=0.8, output_stride=16,
                                                                 channels=64))
    base = ['--train-images', 'i', '--train-masks', 'm', '--num-classes', '3']
    args = seg.parse_args(base + ['--head', 'toy', '--lr', '0.02'])
    assert (args.opt, args.lr, args.momentum, args.output_stride) == ('sgd', 0.02, 0.8, 16)
    assert args.weight_decay == seg.RECIPE['weight_decay'] and args.head_kwargs == {'channels': 64}
    args = seg.parse_args(base)
    assert (args.opt, args.lr, args.epochs) == ('adamw', 1e-4, 10) and args.head_kwargs == {}


# ------------------------------------------------------------------------------------------
# threads


class _ThreadsDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 2

    def __getitem__(self, i):
        return torch.get_num_threads()


def test_loader_workers_use_one_thread():
    """ The README's claim: a data-loading worker computes on one intra-op thread (torch's worker loop
    sets it), whatever the main process uses. """
    from dgmn_timm.tools.engine import make_loader
    threads = torch.get_num_threads()
    loader = make_loader(_ThreadsDataset(), batch_size=1, workers=1)
    assert [int(b) for b in loader] == [1, 1]
    assert torch.get_num_threads() == threads  # the main process keeps its own


def test_default_threads_leave_room_for_workers(monkeypatch):
    from dgmn_timm.tools import cli as engine
    threads = torch.get_num_threads()
    monkeypatch.delenv('OMP_NUM_THREADS', raising=False)
    monkeypatch.setattr(engine, 'cpu_count', lambda: 3)
    try:
        assert engine.set_threads(None, 1) == 2 == torch.get_num_threads()
        assert engine.set_threads(1, 1) == 1 == torch.get_num_threads()
        monkeypatch.setenv('OMP_NUM_THREADS', '1')  # an explicit environment setting is kept
        torch.set_num_threads(1)
        assert engine.set_threads(None, 0) == 1
    finally:
        torch.set_num_threads(threads)
    monkeypatch.setattr(engine, 'cpu_count', lambda: 2)
    assert (engine.default_workers(), engine.default_threads(1)) == (1, 1)
    monkeypatch.setattr(engine, 'cpu_count', lambda: 16)
    assert (engine.default_workers(), engine.default_threads(4)) == (4, 12)
    monkeypatch.setenv('LOCAL_WORLD_SIZE', '4')  # torchrun: 4 processes share the cores
    assert (engine.default_workers(), engine.default_threads(2)) == (2, 2)


def test_extract_failing_before_its_first_chunk_leaves_nothing(image_folder, weights, tmp_path, monkeypatch):
    """ A run that stops before its first chunk is saved leaves no OUTPUT.parts/ to block the corrected command. """
    ckpt, _ = weights
    out = tmp_path / 'feats.safetensors'
    args = [image_folder, '--output', str(out), '--checkpoint', ckpt] + FAST

    def fail(*a, **kw):
        raise RuntimeError('out of memory')

    monkeypatch.setattr(extract, 'compute_features', fail)
    with pytest.raises(RuntimeError, match='out of memory'):
        extract.main(args)
    assert list(tmp_path.iterdir()) == []
    monkeypatch.undo()
    extract.main(args)
    assert out.exists() and not (tmp_path / 'feats.safetensors.parts').exists()


def test_extract_overwrite_replaces_only_with_the_flag(image_folder, weights, tmp_path):
    ckpt, _ = weights
    out = tmp_path / 'feats.safetensors'
    args = [image_folder, '--output', str(out), '--checkpoint', ckpt] + FAST
    extract.main(args)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(UsageError, match='already exist.*--overwrite'):
        extract.main(args)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before
    extract.main(args + ['--overwrite', '--levels', '3'])
    from safetensors.torch import load_file
    assert list(load_file(str(out))) == ['level3']
