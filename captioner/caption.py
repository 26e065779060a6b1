"""Caption images: `python -m captioner.caption kitten.jpg photos/ ckpt_path=... beam_size=3`.

Arguments without `=` are image files or folders; the others are overrides of conf/caption.yaml.
Prints `path<TAB>caption` per image (with n_best > 1: each caption followed by its probability), or writes JSON
with `output=`. Unreadable files are reported one line each and skipped; the exit status is then 1.
With `attention=true` (attention models: model=show_attend_tell, transformer) each image's first caption is also
drawn as `<image stem>.attention.png` beside the image: the image and, per word, where the model looked.
"""
import json
import os
import sys
from pathlib import Path

from captioner import checks
from captioner.cli import compose_config, one_line_errors, show_help
from captioner.evaluation.attention import write_attention_png
from captioner.models.decoding import decode_options
from captioner.serving.inference import IMAGE_SUFFIXES, Captioner, open_image
from captioner.utils import CaptionerError, atomic_write_text


def expand(paths, unreadable=None):
    """Image files of `paths` (folders searched recursively); folders that cannot be listed go to `unreadable`
    as (folder, error) instead of being skipped silently."""
    files = []
    for p in map(Path, paths):
        if p.is_dir():
            found = []
            for folder, _, names in os.walk(p, onerror=lambda e: unreadable is not None and unreadable.append(
                    (Path(e.filename), f"{type(e).__name__}: {e.strerror}"))):
                found += [Path(folder, n) for n in names if Path(n).suffix.lower() in IMAGE_SUFFIXES]
            files += sorted(found)
        else:
            files.append(p)
    return files


def caption_files(captioner: Captioner, files, batch_size=64, **decode):
    """Yields (path, [(caption, probability), ...] or None, error message)."""
    for start in range(0, len(files), batch_size):
        images, ok = [], []
        for f in files[start:start + batch_size]:
            try:
                images.append(captioner.encoder_input(open_image(f)))  # not a batch of full-size photos in memory
                ok.append(f)
            except Exception as e:  # any unreadable file: report it and go on with the rest
                yield f, None, f"{type(e).__name__}: {e}" if str(e) else type(e).__name__
        if images:
            for f, caps in zip(ok, captioner.caption(images, **decode)):
                yield f, caps, None


def draw_attention(captioner: Captioner, path: Path, caption: str) -> Path:
    """Writes `caption`'s attention maps over the image at `path` beside it, as <stem>.attention.png."""
    image = open_image(path)  # opened again: one image in memory at a time, as captioning has it
    rows = captioner.attention(captioner.features([image]), [caption])[0]
    out = path.with_name(f"{path.stem}.attention.png")
    write_attention_png(out, image, caption, rows)
    return out


@one_line_errors
def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if show_help(argv, __doc__, "caption"):
        return
    paths = [a for a in argv if "=" not in a]
    cfg = compose_config("caption", [a for a in argv if "=" in a])
    checks.check_caption(cfg)  # every key, and that output= can be written, before any work
    if not paths:
        raise CaptionerError("no images given; usage: python -m captioner.caption IMAGE_OR_FOLDER ... [key=value ...]")
    unreadable = []
    files = expand(paths, unreadable)
    for folder, error in unreadable:
        print(f"{folder}\terror: the folder cannot be read ({error})", file=sys.stderr)
    if not files:
        raise CaptionerError(f"no image files found in {', '.join(paths)}"
                             f"{f' ({len(unreadable)} folders could not be read)' if unreadable else ''}.")
    captioner = Captioner(cfg.ckpt_path, cfg.device)
    if cfg.attention and not captioner.has_attention:
        raise CaptionerError(f"attention=true needs a model with attention (model=show_attend_tell or transformer); "
                             f"{captioner.ckpt_path} holds a {captioner.info['model']} model, which has none.")
    results, failed = [], 0
    for path, caps, error in caption_files(captioner, files, cfg.batch_size, **decode_options(cfg)):
        if error:
            failed += 1
            print(f"{path}\terror: {error}", file=sys.stderr)
            continue
        results.append({"path": str(path), "captions": [{"caption": c, "probability": p} for c, p in caps]})
        if cfg.attention:
            results[-1]["attention"] = str(draw_attention(captioner, path, caps[0][0]))
        if not cfg.output:
            if cfg.n_best > 1 and cfg.temperature is None:
                print(f"{path}\t" + "\t".join(f"{c}\t{p:.4f}" for c, p in caps))
            else:
                print(f"{path}\t{caps[0][0]}")
    if cfg.output:
        atomic_write_text(cfg.output, json.dumps({"checkpoint": str(captioner.ckpt_path), "results": results}, indent=1))
        print(f"Wrote {len(results)} captions to {cfg.output}", file=sys.stderr)
    if cfg.attention:
        print(f"Wrote {len(results)} attention maps beside the images (<stem>.attention.png).", file=sys.stderr)
    if failed or unreadable:
        folders = f"; {len(unreadable)} folders could not be read" if unreadable else ""
        sys.exit(f"{failed} of {len(files)} images could not be read{folders}.")


if __name__ == "__main__":
    main()
