"""Output shared by the benchmark scripts (imported as a plain module: a script's folder is
on sys.path)."""
import json


def report(res: dict, out: str | None) -> int:
    """Prints `res` as indented JSON and writes it to `out` too when given. Returns the exit
    status: 1 when any of res["rows"] (if present) holds an "error", else 0."""
    text = json.dumps(res, indent=1)
    print(text)
    if out:
        with open(out, "w") as f:
            f.write(text + "\n")
    return 0 if all("error" not in r for r in res.get("rows", [])) else 1
