#!/usr/bin/env python3
"""Stand-ins for minikube, kubectl, docker and nix: the Minikube path cannot run on a machine
without a container engine, so xtask's minikube driver is tested against these instead. One
script, installed under each tool's name; it answers the calls the driver makes the way the real
tool does (output, exit codes, and the refusals that matter: a context that does not exist, a
cluster that is stopped, an immutable Job template, exec into a pod that is not ready), and
appends every call to $STANDIN_DIR/calls.log.

The cluster is a small model kept in $STANDIN_DIR/cluster.json. Time passes per call: LocalStack
becomes ready when its rollout is waited for; the init Job completes (creating the stream) when
waited for, but only once LocalStack is ready; worker pods are not ready until the stream exists
(the worker waits for its stream, /ready 503); a rollout status waits for that. The fleet's
`admin snapshot --json` is the converged lease table of that model:
limit = min(cap, ceil(shards / workers)), each worker holding up to the limit.

Knobs (environment): STANDIN_MINIKUBE_START_FAILS=1, STANDIN_DOCKER_DOWN=1, STANDIN_NIX_FAILS=1,
STANDIN_IMAGE_CONTENT (what the worker image is built from; another value, another image).
"""

import hashlib
import io
import json
import os
import re
import sys
import tarfile

DIR = os.environ["STANDIN_DIR"]
STATE = os.path.join(DIR, "cluster.json")
PROFILE = "kds-lab"


def load():
    try:
        with open(STATE) as f:
            return json.load(f)
    except FileNotFoundError:
        return {"profile": None, "docker_images": {}, "ns": None}


def save(state):
    tmp = STATE + ".tmp"
    with open(tmp, "w") as f:
        json.dump(state, f, indent=1, sort_keys=True)
    os.replace(tmp, STATE)


def log(tool, args):
    with open(os.path.join(DIR, "calls.log"), "a") as f:
        f.write(" ".join([tool] + args) + "\n")


def die(msg, code=1):
    sys.stderr.write(msg + "\n")
    sys.exit(code)


def image_content():
    return os.environ.get("STANDIN_IMAGE_CONTENT", "worker-v1")


def content_hash(text, n):
    return hashlib.sha256(text.encode()).hexdigest()[:n]


# ---------------------------------------------------------------- minikube


def minikube(args, st):
    if args[:1] in (["--help"], ["version"]):
        print("minikube version: v1.37.0")
        return
    if args[:1] == ["start"]:
        if os.environ.get("STANDIN_MINIKUBE_START_FAILS"):
            die("X Exiting due to DRV_NOT_HEALTHY: docker is not running", 69)
        if st["profile"] is None:
            st["profile"] = {"running": True, "images": []}
        st["profile"]["running"] = True
        print(f'* Done! kubectl is now configured to use "{PROFILE}" cluster')
        return
    if args[:1] == ["status"]:
        # Exit 0 only for a running profile, as minikube does (7: stopped, 85: no profile).
        if st["profile"] is None:
            die(f'* Profile "{PROFILE}" not found.', 85)
        if not st["profile"]["running"]:
            print("host: Stopped")
            sys.exit(7)
        print("host: Running\nkubelet: Running\napiserver: Running")
        return
    if args[:1] == ["stop"]:
        if st["profile"]:
            st["profile"]["running"] = False
        return
    if args[:1] == ["delete"]:
        # Deleting a profile that does not exist succeeds, as with the real minikube.
        st["profile"] = None
        st["ns"] = None
        print(f'* Removed all traces of the "{PROFILE}" cluster.')
        return
    if args[:3] == ["-p", PROFILE, "image"] and args[3] == "load":
        prof = st["profile"]
        if not prof or not prof["running"]:
            die(f'X Exiting due to GUEST_STATUS: profile "{PROFILE}" not found or not running', 80)
        source = args[4]
        if os.path.isfile(source):
            with tarfile.open(source) as t:
                manifest = json.load(t.extractfile("manifest.json"))
            tags = manifest[0]["RepoTags"]
        elif source in st["docker_images"]:
            tags = [source]
        else:
            die(f"X Exiting due to GUEST_IMAGE_LOAD: {source}: image not known to docker", 80)
        prof["images"] = sorted(set(prof["images"]) | set(tags))
        return
    die(f"standin minikube: unexpected call {args}", 64)


# ---------------------------------------------------------------- docker


def docker(args, st):
    if args[:1] in (["--help"], ["--version"]):
        print("Docker version 28.0.0, build standin")
        return
    if args[:1] == ["info"]:
        if os.environ.get("STANDIN_DOCKER_DOWN"):
            die("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
        print("Server Version: 28.0.0")
        return
    if os.environ.get("STANDIN_DOCKER_DOWN"):
        die("Cannot connect to the Docker daemon at unix:///var/run/docker.sock.")
    if args[:2] == ["build", "-t"]:
        st["docker_images"][args[2]] = "sha256:" + content_hash("docker:" + image_content(), 64)
        return
    if args[:2] == ["image", "inspect"]:
        name = args[-1]
        if name not in st["docker_images"]:
            die(f"Error: No such image: {name}")
        print(st["docker_images"][name])
        return
    if args[:1] == ["tag"]:
        if args[1] not in st["docker_images"]:
            die(f"Error response from daemon: No such image: {args[1]}")
        st["docker_images"][args[2]] = st["docker_images"][args[1]]
        return
    die(f"standin docker: unexpected call {args}", 64)


# ---------------------------------------------------------------- nix


def nix(args, st):
    if args[:1] == ["--version"]:
        print("nix (Nix) 2.28.3")
        return
    if "build" in args:
        if args[args.index("build") + 1] != ".#image":
            die(f"standin nix: unexpected build {args}", 64)
        if os.environ.get("STANDIN_NIX_FAILS"):
            die("error: cannot build '/nix/store/...-stream-kds-worker.drv': no build users available")
        if "nix-command flakes" not in args:
            die("error: experimental Nix feature 'nix-command' is disabled")
        link = args[args.index("--out-link") + 1]
        # Like streamLayeredImage: a script that writes the image tarball to stdout, tagged
        # with a hash of what it is built from (flake.nix has `tag = null`).
        tar_path = os.path.join(DIR, "image-" + content_hash(image_content(), 8) + ".tar")
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w") as t:
            tag = "kds-worker:" + content_hash("nix:" + image_content(), 32)
            data = json.dumps([{"Config": "config.json", "RepoTags": [tag], "Layers": []}]).encode()
            info = tarfile.TarInfo("manifest.json")
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        with open(tar_path, "wb") as f:
            f.write(buf.getvalue())
        script = os.path.join(DIR, "stream-image-" + content_hash(image_content(), 8))
        with open(script, "w") as f:
            f.write(f"#!/bin/sh\nexec cat '{tar_path}'\n")
        os.chmod(script, 0o755)
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(script, link)
        return
    die(f"standin nix: unexpected call {args}", 64)


# ---------------------------------------------------------------- kubectl


def kv_block(text, key):
    m = re.search(rf"{key}:\s*\|-?\n((?:\s+.*\n?)*)", text)
    return m.group(1) if m else ""


def cap_of(configmap_text):
    m = re.search(r"max_leases_cap\s*=\s*(\d+)", configmap_text)
    return int(m.group(1)) if m else 80


def read_overlay(path):
    """The overlay xtask writes: resources, image tag, replicas, the config-hash annotation."""
    text = open(os.path.join(path, "kustomization.yaml")).read()
    base = re.search(r"resources:\n\s+- (\S+)", text).group(1)
    base_dir = os.path.normpath(os.path.join(path, base))
    if not os.path.isfile(os.path.join(base_dir, "kustomization.yaml")):
        die(f"error: accumulating resources: '{base_dir}' must resolve to a kustomization")
    return {
        "base": base_dir,
        "tag": re.search(r'newTag: "([^"]+)"', text).group(1),
        "replicas": int(re.search(r"path: /spec/replicas\n\s+value: (\d+)", text).group(1)),
        "config_hash": re.search(r'config-hash\n\s+value: "([^"]+)"', text).group(1),
    }


def pods_ready(ns):
    return ns["stream_shards"] is not None


def roll(ns, template):
    """A changed pod template replaces every pod: a new coordinator term follows."""
    if ns["sts"]["template"] != template:
        ns["sts"]["template"] = template
        ns["sts"]["rollouts"] += 1
        ns["epoch"] += 1


def snapshot(ns):
    shards, workers = ns["stream_shards"], ns["sts"]["replicas"]
    cap = cap_of(ns["configmap"])
    limit = min(cap, -(-shards // max(workers, 1)))
    owners, left = {}, shards
    for i in range(workers):
        held = min(limit, left)
        left -= held
        owners[f"kds-consumer-{i}"] = held
    now = "2026-11-28T12:00:00Z"
    return {
        "stream": "kds-lab",
        "open_shards": shards,
        "lease_limits": {
            "max_leases_per_worker": limit,
            "shard_count": shards,
            "worker_count": workers,
            "desired_workers": workers,
            "live_workers": workers,
            "cap": cap,
            "capacity_deficit": max(0, shards - cap * workers),
            "workers_needed": -(-shards // max(cap, 1)),
            "epoch": ns["epoch"],
            "version": ns["epoch"],
            "computed_by": "kds-consumer-0",
            "updated_at": now,
        },
        "coordinator": {"owner": "kds-consumer-0", "epoch": ns["epoch"], "counter": 1, "renewed_at": now},
        "heartbeats": [
            {"worker_id": w, "counter": 1, "leases_held": n, "renewed_at": now} for w, n in owners.items()
        ],
        "leases": {
            "readable": shards,
            "unowned_readable": left,
            "finished": 0,
            "parents_pending": 0,
            "by_owner": {w: n for w, n in owners.items() if n},
        },
    }


def kubectl(args, st):
    if args[:1] == ["--help"]:
        print("kubectl controls the Kubernetes cluster manager.")
        return
    context = None
    if args[:1] == ["--context"]:
        context, args = args[1], args[2:]
    if args[:2] == ["config", "current-context"]:
        if st["profile"] is None:
            die("error: current-context is not set")
        print(PROFILE)
        return
    if context is not None and context != PROFILE:
        die(f'error: context "{context}" does not exist')
    if st["profile"] is None:
        die(f'error: context "{PROFILE}" does not exist')
    if not st["profile"]["running"]:
        die("The connection to the server 192.168.49.2:8443 was refused - did you specify the right host or port?")
    if args[:2] != ["-n", "kds-lab"]:
        die(f"standin kubectl: every call names the namespace: {args}", 64)
    args = args[2:]
    ns = st["ns"]
    verb = args[0]

    if verb == "apply" and args[1] == "-k":
        ov = read_overlay(args[2])
        image = f"kds-worker:{ov['tag']}"
        if image not in st["profile"]["images"]:
            # Applied anyway; the pods would sit in ErrImagePull. Recorded, then asserted.
            st.setdefault("pulls_of_missing_images", []).append(image)
        configmap = open(os.path.join(ov["base"], "configmap.yaml")).read()
        if ns is None:
            ns = st["ns"] = {
                "localstack_ready": False,
                "job": None,
                "stream_shards": None,
                "epoch": 1,
                "configmap": configmap,
                "sts": {"replicas": ov["replicas"], "template": None, "rollouts": 0},
            }
        job = ns["job"]
        if job is not None and job["image"] != image:
            die('The Job "kds-init" is invalid: spec.template: Invalid value: field is immutable')
        if job is None:
            ns["job"] = {"image": image, "complete": False}
        ns["configmap"] = configmap
        ns["sts"]["replicas"] = ov["replicas"]
        template = {"image": image, "config_hash": ov["config_hash"]}
        if ns["sts"]["template"] is None:
            ns["sts"]["template"] = template
        else:
            roll(ns, template)
        print("statefulset.apps/kds-consumer configured")
        return
    if ns is None:
        if verb == "delete" and "--ignore-not-found" in args:
            return
        die('Error from server (NotFound): namespaces "kds-lab" not found')
    if verb == "apply" and args[1] == "-f":
        ns["configmap"] = open(args[2]).read()
        return
    if verb == "patch":
        patch = json.loads(args[args.index("-p") + 1])
        ann = patch["spec"]["template"]["metadata"]["annotations"]["kds-lab/config-hash"]
        roll(ns, dict(ns["sts"]["template"], config_hash=ann))
        return
    if verb == "rollout" and args[1] == "status":
        if args[2] == "deployment/localstack":
            ns["localstack_ready"] = True
            return
        if not pods_ready(ns):
            die('error: timed out waiting for the condition: 0 of %d updated replicas are ready '
                '(workers wait for their stream: /ready 503 "waiting for stream")' % ns["sts"]["replicas"])
        return
    if verb == "wait" and args[-2] == "job/kds-init":
        if ns["job"] is None:
            die('Error from server (NotFound): jobs.batch "kds-init" not found')
        if not ns["localstack_ready"]:
            die("error: timed out waiting for the condition on jobs/kds-init (LocalStack not ready)")
        ns["job"]["complete"] = True
        if ns["stream_shards"] is None:
            ns["stream_shards"] = 30
        return
    if verb == "delete":
        if args[1] == "-k":
            st["ns"] = None
            return
        if args[1] == "job/kds-init":
            ns["job"] = None
            return
        if args[1] == "pod":
            ns["epoch"] += 1
            return
    if verb == "scale":
        ns["sts"]["replicas"] = int(args[2].split("=")[1])
        return
    if verb == "exec":
        if not pods_ready(ns):
            die('error: unable to upgrade connection: container not found ("worker")')
        cmd = args[args.index("--") + 1:]
        admin = cmd[cmd.index("admin") + 1:]
        if admin[:1] == ["snapshot"]:
            print(json.dumps(snapshot(ns)))
            return
        if admin[:1] == ["reshard"]:
            ns["stream_shards"] = int(admin[1])
            return
        if admin[:1] == ["produce"]:
            return
        die(f"standin kubectl exec: unexpected command {cmd}", 64)
    if verb == "get":
        what = args[1]
        if what == "events":
            print("LAST SEEN   TYPE     REASON    OBJECT              MESSAGE")
            return
        if what == "pods":
            ready = "True" if pods_ready(ns) else "False"
            items = [
                {
                    "metadata": {"name": f"kds-consumer-{i}"},
                    "status": {"phase": "Running", "conditions": [{"type": "Ready", "status": ready}]},
                }
                for i in range(ns["sts"]["replicas"])
            ]
            print(json.dumps({"items": items}))
            return
        if what == "statefulset/kds-consumer":
            print(ns["sts"]["replicas"], end="")
            return
        if what == "configmap/kds-worker-config":
            print(kv_block(ns["configmap"], "config.toml"), end="")
            return
    if verb == "logs":
        print("kds-consumer-0 worker: started")
        return
    die(f"standin kubectl: unexpected call {args}", 64)


def main():
    tool = os.path.basename(sys.argv[0])
    args = sys.argv[1:]
    log(tool, args)
    st = load()
    {"minikube": minikube, "docker": docker, "nix": nix, "kubectl": kubectl}[tool](args, st)
    save(st)


if __name__ == "__main__":
    main()
