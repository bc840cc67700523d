"""Videos of the driving: one episode of the deterministic policy, drawn for people to watch.

    info = record_episode(env, policy, Path("videos/iter_000050.gif"), seed=0)

Each frame shows, top to bottom: the env's own view of the scene where it has one (`env.render()`
of an env made with `render_mode="rgb_array"`: the embedded env's top-down view around the car,
CARLA's chase camera; the town draws the route ahead in it), the camera frames the policy saw
(its observation's image stack, oldest to newest, scaled up), and a text panel (step, return so
far, this step's reward and its terms, speed, action; on a route, how much of it is done and, in
red, any infraction; the last frame says how the episode ended, with the driving score).

Written as an animated GIF with Pillow, at the env's control rate (real time): no display, no
ffmpeg, and W&B plays it. With `evaluation.video` on, rl/train.py records one at each evaluation
and one at the end (`record_evaluation_video`), on an evaluation env runner, with its env and the
weights just evaluated: on a cluster that is where the CARLA server is. Off, nothing here runs.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont

BACKGROUND = (24, 24, 24)
TEXT = (235, 235, 235)
LINE_HEIGHT = 14
TEXT_LINES = 6  # caption, three lines per step, how the episode ended and scored: every frame the same size
ALERT = (255, 90, 80)
CAMERA_HEIGHT = 150  # pixels the camera frames are scaled to when the env has no view of its own
MAX_STEPS = 10_000  # an env without a time limit still ends its video


@dataclass
class VideoInfo:
    path: Path
    steps: int
    episode_return: float
    end: str
    seconds: float  # wall time to play the episode, draw and write it
    bytes: int


def record_evaluation_video(algo, path: Path, seed: int) -> VideoInfo:
    """Records one episode on the first evaluation env runner (the driver's own when evaluation
    runs there) and writes it to `path`."""
    group = algo.eval_env_runner_group
    remote = group.healthy_env_runner_ids()
    if remote:
        [(data, info)] = group.foreach_env_runner(
            lambda runner: record_on_env_runner(runner, seed), remote_worker_ids=remote[:1], local_env_runner=False
        )
    else:
        data, info = record_on_env_runner(group.local_env_runner, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(data)
    partial.replace(path)
    return VideoInfo(path=path, **info)


def record_on_env_runner(runner, seed: int) -> tuple[bytes, dict]:
    """Runs on an evaluation env runner: one episode in its first env with its module's
    deterministic actor. The runner resets its envs before its next evaluation (it samples
    whole episodes), so the episode played here does not disturb it."""
    from rl.evaluation import module_policy

    env = runner.env.unwrapped.envs[0]
    with tempfile.TemporaryDirectory() as tmp:
        info = record_episode(env, module_policy(runner.module), Path(tmp) / "episode.gif", seed=seed)
        return info.path.read_bytes(), {k: v for k, v in dataclasses.asdict(info).items() if k != "path"}


def record_episode(env, policy, path: Path, seed: int | None = None, fps: float | None = None) -> VideoInfo:
    """Plays one episode of `policy` (observation -> action) in `env` and writes it to `path`."""
    start = time.perf_counter()
    obs, info = env.reset(seed=seed)
    first_view = _view(env)
    blank = None if first_view is None else np.zeros_like(first_view)

    def draw(lines: list[str]) -> Image.Image:
        # Every frame the same size: a view lost mid-episode (a CARLA server lost, and its chase
        # camera with it) is drawn black; an env that had none at the start gets none.
        view = _view(env) if blank is not None else None
        return _draw(blank if view is None or view.shape != blank.shape else view, obs, lines)

    frames = [_draw(first_view, obs, [f"step 0   return 0.00   ({_describe(info)})"])]
    total, steps, done, end = 0.0, 0, False, "step limit"
    while not done and steps < MAX_STEPS:
        action = np.asarray(policy(obs), np.float64)
        obs, reward, terminated, truncated, info = env.step(action)
        total, steps, done = total + float(reward), steps + 1, terminated or truncated
        lines = [
            f"step {steps}   return {total:.2f}   reward {float(reward):+.2f} {_terms(info)}",
            f"action [{', '.join(f'{a:+.2f}' for a in action.ravel())}]   {_describe(info)}",
            _route(info),
        ]
        if done:
            end = info.get("episode_end") or ("terminated" if terminated else "truncated")
        if done or steps == MAX_STEPS:
            lines += [f"episode ended: {end}", _score(info)]
        frames.append(draw(lines))
    path.parent.mkdir(parents=True, exist_ok=True)
    fps = fps or env.metadata.get("render_fps") or 10.0
    _write_gif(frames, path, fps)
    return VideoInfo(path, steps, total, end, time.perf_counter() - start, path.stat().st_size)


def _view(env) -> np.ndarray | None:
    return env.render() if getattr(env, "render_mode", None) == "rgb_array" else None


def _draw(view: np.ndarray | None, obs, lines: list[str]) -> Image.Image:
    camera = _camera_frames(obs)
    width = view.shape[1] if view is not None else None
    rows = [] if view is None else [Image.fromarray(np.asarray(view, np.uint8))]
    if camera:
        side = CAMERA_HEIGHT if width is None else min(CAMERA_HEIGHT, width // len(camera))
        tiles = [Image.fromarray(f).resize((side, side), Image.NEAREST).convert("RGB") for f in camera]
        strip = Image.new("RGB", (side * len(tiles) + 4 * (len(tiles) - 1), side), BACKGROUND)
        for i, tile in enumerate(tiles):
            strip.paste(tile, (i * (side + 4), 0))
        rows.append(strip)
    width = max([width or 0, *(r.width for r in rows), 420])
    height = sum(r.height for r in rows) + 4 * len(rows) + LINE_HEIGHT * TEXT_LINES
    canvas = Image.new("RGB", (width, height), BACKGROUND)
    y = 0
    for row in rows:
        canvas.paste(row, ((width - row.width) // 2, y))
        y += row.height + 4
    draw = ImageDraw.Draw(canvas)
    caption = "camera: what the policy sees, oldest to newest" if camera else ""
    for text in [caption, *lines]:
        draw.text((6, y), text, fill=ALERT if text.startswith(INFRACTION) else TEXT, font=ImageFont.load_default())
        y += LINE_HEIGHT
    return canvas


def _camera_frames(obs) -> list[np.ndarray]:
    """The image stack in an observation (the driving contract's `image`: uint8, frames first)."""
    for leaf in obs.values() if isinstance(obs, dict) else [obs]:
        leaf = np.asarray(leaf)
        if leaf.dtype == np.uint8 and leaf.ndim == 3:
            return list(leaf)
    return []


def _terms(info: dict) -> str:
    terms = info.get("reward_terms") or {}
    shown = ", ".join(f"{name} {value:+.2f}" for name, value in terms.items() if value)
    return f"({shown})" if shown else ""


def _describe(info: dict) -> str:
    parts = []
    if "speed_mps" in info:
        parts.append(f"speed {info['speed_mps']:.1f} m/s")
    if "lateral_offset_m" in info:
        parts.append(f"lane offset {info['lateral_offset_m']:+.2f} m")
    return "   ".join(parts)


INFRACTION = "INFRACTION"


def _route(info: dict) -> str:
    """Envs that drive a route (carla_env/driving_score.py): its progress, and this step's
    infractions, drawn in red."""
    if "route_progress" not in info:
        return ""
    now = info.get("infractions_now") or []
    return (f"{INFRACTION}: {', '.join(now)}   " if now else "") + f"route {info['route_progress']:.0%} done"


def _score(info: dict) -> str:
    if "driving_score" not in info:
        return ""
    counted = ", ".join(f"{k} {v}" for k, v in info["infractions"].items() if v) or "none"
    return (f"driving score {info['driving_score']:.2f}   route completion {info['route_completion']:.0%}"
            f"   infractions: {counted}")


def _write_gif(frames: list[Image.Image], path: Path, fps: float) -> None:
    # One palette for the whole video (the first frame's, plus what the text needs): quantizing
    # each frame on its own would cost more and make colours flicker.
    # The alert colour joins it, as later frames may draw an infraction the first does not.
    sample = Image.new("RGB", (frames[0].width, frames[0].height + 8), ALERT)
    sample.paste(frames[0], (0, 0))
    palette = sample.quantize(colors=128, method=Image.Quantize.MEDIANCUT)
    indexed = [frame.quantize(palette=palette, dither=Image.Dither.NONE) for frame in frames]
    partial = path.with_name(path.name + ".partial")
    indexed[0].save(partial, format="GIF", save_all=True, append_images=indexed[1:],
                    duration=round(1000 / fps), loop=0)
    partial.replace(path)
