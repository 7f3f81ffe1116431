"""Port of the InternVL3.5 cards' video input (seed card 004, "video multi-round conversation"):
`get_index`, `load_video` and the `Frame{i+1}: <image>\\n` prefix, for tests.

Literal, with the cards' own reader: decord's VideoReader opened as the card opens it, the tiling and
transform of tests/reference_preprocess.py (the cards' dynamic_preprocess and build_transform).
"""

import av  # noqa: F401 — before decord: decord's libraries export libvpx's symbols, which would
# otherwise bind PyAV's libvpx encoder (tests/video_files.py) to decord's older copy
import numpy as np
import torch
from decord import VideoReader, cpu
from PIL import Image

from tests.reference_preprocess import dynamic_preprocess, transform


def get_index(bound, fps, max_frame, first_idx=0, num_segments=32):
    if bound:
        start, end = bound[0], bound[1]
    else:
        start, end = -100000, 100000
    start_idx = max(first_idx, round(start * fps))
    end_idx = min(round(end * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    frame_indices = np.array([int(start_idx + (seg_size / 2) + np.round(seg_size * idx)) for idx in range(num_segments)])
    return frame_indices


def load_video(video_path, bound=None, input_size=448, max_num=1, num_segments=32):
    # -> (pixel_values: [sum T_i, 3, S, S] float32 (torch), num_patches_list)
    vr = VideoReader(video_path, ctx=cpu(0), num_threads=1)
    max_frame = len(vr) - 1
    fps = float(vr.get_avg_fps())
    pixel_values_list, num_patches_list = [], []
    frame_indices = get_index(bound, fps, max_frame, first_idx=0, num_segments=num_segments)
    for frame_index in frame_indices:
        img = Image.fromarray(vr[frame_index].asnumpy()).convert("RGB")
        img = dynamic_preprocess(img, image_size=input_size, use_thumbnail=True, max_num=max_num)
        pixel_values = torch.stack([transform(tile, input_size) for tile in img])
        num_patches_list.append(pixel_values.shape[0])
        pixel_values_list.append(pixel_values)
    return torch.cat(pixel_values_list), num_patches_list


def video_question(num_patches_list, question):
    video_prefix = "".join([f"Frame{i + 1}: <image>\n" for i in range(len(num_patches_list))])
    return video_prefix + question
