"""`malmen-hf push`: upload a saved editor (with its model card) or a saved edit artifact to the Hugging Face Hub."""

import argparse
from pathlib import Path

from .common import editor_folder


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Adds `malmen-hf push` and its options to the command line's `subparsers`."""
    parser = subparsers.add_parser("push", help="upload a saved editor or edit artifact to the Hugging Face Hub")
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--editor", help="a saved editor folder (its README.md card goes along, or one is rendered)")
    what.add_argument("--edits", help="a saved edit artifact folder (from `edit --save-edits` or `handle.save`)")
    parser.add_argument("--repo-id", required=True, help="the Hub repository, e.g. org/name")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--token", help="Hub token (default: the stored login)")
    parser.add_argument("--revision", help="branch to push to")
    parser.add_argument("--commit-message", help="message of the commit")
    parser.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> None:
    """Uploads a saved editor (with its card) or a saved edit artifact to a Hub repository, in one commit."""
    options = {"commit_message": args.commit_message, "revision": args.revision, "create_pr": args.create_pr}
    if args.edits:
        if not (Path(args.edits) / "edit_manifest.json").is_file():
            raise FileNotFoundError(f"edits not found: {args.edits} holds no edit_manifest.json")
        from huggingface_hub import HfApi

        api = HfApi(token=args.token)
        repo_id = api.create_repo(args.repo_id, private=args.private, exist_ok=True).repo_id
        commit = api.upload_folder(repo_id=repo_id, folder_path=args.edits, **options)
    else:
        folder = editor_folder(args.editor)
        from huggingface_hub import ModelCard

        from .. import MalmenEditorModel

        editor = MalmenEditorModel.from_pretrained(folder)
        card_path = folder / "README.md"
        model_card = ModelCard.load(card_path) if card_path.is_file() else None
        commit = editor.push_to_hub(
            args.repo_id, private=args.private, token=args.token, model_card=model_card, **options
        )
    print(f"Pushed to {args.repo_id}: {commit}")
