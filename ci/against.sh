# Sourced by the bench scripts that compare this build with a commit (`--against`).
# build_against COMMIT WORK: builds COMMIT (release, a target directory of its own) in a
# worktree under WORK and prints its dds binary's path.
build_against() {
  git worktree add -q --detach "$2/old-src" "$1"
  (cd "$2/old-src" && CARGO_TARGET_DIR="$2/old-target" cargo build --release --locked -q)
  echo "$2/old-target/release/dds"
}
# against_cleanup WORK: removes the worktree build_against made there, if any.
against_cleanup() {
  git worktree remove --force "$1/old-src" >/dev/null 2>&1 || true
}
