#!/usr/bin/python
# -*- coding: utf-8 -*-
"""Ansible module reconciler.edge.reconcile: run the `reconciler` CLI on the managed host and map its
JSON output onto Ansible's changed/failed/diff. It talks to the CLI only (never imports the reconciler
package), so the module needs nothing but the Python standard library and Ansible's module_utils."""

from __future__ import annotations

DOCUMENTATION = r"""
---
module: reconcile
short_description: Make libvirt and Mosquitto state on an edge host match reconciler manifests
version_added: "0.1.0"
description:
  - Runs C(reconciler plan) or C(reconciler apply) with C(-o json) on the managed host, where the
    module runs, against that host's libvirt and MQTT broker.
  - In check mode, or with O(state=planned), the module only plans. RV(changes) then lists what
    apply would do, and C(changed) is true exactly when the plan has changes.
  - Otherwise the module applies, and C(changed) is true exactly when a change was applied.
  - A change the reconciler refuses, a failed change or an error fails the task with the
    reconciler's own message.
  - Secrets are handed to the reconciler through its environment, never on its command line.
author:
  - reconciler project (@example)
requirements:
  - The C(reconciler) command on the managed host (see O(reconciler_bin)).
attributes:
  check_mode:
    support: full
    description: Plans and reports the pending changes; nothing is applied.
  diff_mode:
    support: full
    description: Returns each changed object's declared fields before and after.
options:
  paths:
    description:
      - Manifest files or folders on the managed host, in the order the reconciler reads them.
    type: list
    elements: path
    required: true
  state:
    description:
      - V(applied) makes live state match the manifests (check mode only plans).
      - V(planned) only plans, also outside check mode; C(changed) then means changes are pending.
    type: str
    choices: [applied, planned]
    default: applied
  prune:
    description:
      - Delete managed objects of this O(scope) that no manifest declares.
      - The reconciler requires an explicit scope for it (O(scope), C(RECONCILER_SCOPE) in the task's
        environment, or C(scope) in C(.reconciler.yaml) at the manifests' root), and fails the task otherwise.
    type: bool
    default: false
  force:
    description: Allow a prune of more than half (and more than ten) of a kind's managed objects.
    type: bool
    default: false
  allow_restart:
    description:
      - Restart VMs whose changes need it. Without it such a change is skipped with a warning.
      - Also passed in check mode, so the plan shows what apply would do.
    type: bool
    default: false
  allow_replace:
    description: Redefine VMs whose hypervisor, arch or machine changed.
    type: bool
    default: false
  scope:
    description: Ownership scope written into markers; O(prune) only deletes objects of this scope.
    type: str
  libvirt_uri:
    description: libvirt connection URI on the managed host.
    type: str
  mqtt_url:
    description: The broker, C(mqtt://host:port) or C(mqtts://host:port).
    type: str
  mqtt_username:
    description: Broker admin login (Mosquitto dynamic security).
    type: str
  mqtt_password:
    description:
      - Password of O(mqtt_username). Passed to the reconciler in its environment
        (C(RECONCILER_MQTT_PASSWORD)), never on its command line.
    type: str
  mqtt_password_file:
    description: File on the managed host holding the broker admin password.
    type: path
  mqtt_cafile:
    description: CA file for C(mqtts://).
    type: path
  lock_timeout:
    description: How long apply waits for another run on the same target, for example V(300s).
    type: str
  shutdown_timeout:
    description: Graceful VM shutdown time before a VM is forced off, for example V(60s).
    type: str
  metrics_file:
    description: Write Prometheus metrics to this file (not in check mode).
    type: path
  reconciler_bin:
    description: The reconciler command, a name looked up on E(PATH) or an absolute path.
    type: str
    default: reconciler
notes:
  - Run it with C(serial) to roll a site out in batches; Ansible's forks, limits and vault apply as usual.
  - Without O(mqtt_password) and O(mqtt_password_file) the reconciler reads
    C(RECONCILER_MQTT_PASSWORD) or C(RECONCILER_MQTT_PASSWORD_FILE) from the task's environment.
"""

EXAMPLES = r"""
- name: Make this edge host match its manifests
  reconciler.edge.reconcile:
    paths:
      - /srv/site/common
      - "/srv/site/hosts/{{ inventory_hostname }}"
    state: applied
    prune: false
    allow_restart: false
    libvirt_uri: qemu:///system
    mqtt_url: mqtt://127.0.0.1:1883
    mqtt_username: admin
    mqtt_password: "{{ vault_mqtt_password }}"
    scope: site-a

- name: Show what would change (also works with --check --diff on the applied form)
  reconciler.edge.reconcile:
    paths: [/srv/site/common]
    state: planned
  register: plan

- name: Password from a file on the managed host
  reconciler.edge.reconcile:
    paths: [/srv/site/common]
    mqtt_username: reconciler
    mqtt_password_file: /etc/reconciler/mqtt-admin.password
"""

RETURN = r"""
changes:
  description:
    - The changes of the run as the reconciler's JSON output lists them. Each has C(action)
      (create, update, delete, restart, replace), C(kind), C(name), C(fields), C(status)
      (planned, applied, failed, skipped), C(reason), and C(diff), a list of field changes
      (C(path), C(before), C(after), C(mode); a secret field carries C(secret=true) and no values).
  returned: success or a failed change
  type: list
  elements: dict
  sample:
    - action: update
      kind: MqttRole
      name: sensors
      fields: [spec.description]
      status: applied
      reason: description differs
      diff: [{path: spec.description, before: old, after: new, mode: live}]
summary:
  description: Counts of the plan per action, plus C(unchanged).
  returned: success or a failed change
  type: dict
  sample: {create: 0, update: 1, delete: 0, restart: 0, replace: 0, unchanged: 5}
recap:
  description: Counts of the apply (C(ok), C(changed), C(failed), C(skipped)); empty when the module only planned.
  returned: always
  type: dict
  sample: {ok: 5, changed: 1, failed: 0, skipped: 0}
orphans:
  description: Managed objects no manifest declares (deleted only with O(prune)).
  returned: success
  type: list
  elements: dict
mode:
  description: What the module ran, V(plan) or V(apply).
  returned: always
  type: str
  sample: apply
exit_code:
  description:
    - The reconciler's exit code (plan 0 in sync, 2 changes pending, 1 error; apply 0 done, 1 failed).
    - Not named C(rc) because Ansible counts any non-zero C(rc) as a failed task, and 2 is a success.
  returned: when the reconciler ran
  type: int
  sample: 2
"""

import json
import os

from ansible.module_utils.basic import AnsibleModule


def _value(v):
    # Strings as they are; everything else in compact JSON, keys sorted so a diff never shows reordering.
    if isinstance(v, str):
        return v
    return json.dumps(v, sort_keys=True, separators=(", ", ": "))


def _object_diff(change):
    """One change as an Ansible diff: the object's declared fields before (live) and after (manifest)."""
    before, after = [], []
    for d in change.get("diff") or [{"path": f} for f in change.get("fields") or []]:
        path = d.get("path", "?")
        note = "" if d.get("mode", "live") == "live" else "  # takes effect at %s" % d["mode"]
        if d.get("secret"):
            # The reconciler never prints a secret; neither does the diff.
            before.append("%s: (secret)\n" % path)
            after.append("%s: (secret, changed)%s\n" % (path, note))
            continue
        if d.get("before") is not None:
            before.append("%s: %s\n" % (path, _value(d["before"])))
        if d.get("after") is not None:
            after.append("%s: %s%s\n" % (path, _value(d["after"]), note))
    what = "%s/%s" % (change.get("kind"), change.get("name"))
    action = change.get("action", "")
    if action == "delete":
        after = []
    return {"before_header": "%s (live)" % what, "after_header": "%s (%s)" % (what, action),
            "before": "".join(before), "after": "".join(after)}


def _describe(change):
    return "%s/%s %s: %s" % (change.get("kind"), change.get("name"), change.get("action"),
                             change.get("error") or change.get("held") or change.get("reason") or "failed")


def _command(module, binary, mode):
    p = module.params
    cmd = [binary, mode]
    cmd.extend(p["paths"])
    cmd.extend(["-o", "json"])
    flags = [("scope", "--scope"), ("libvirt_uri", "--libvirt-uri"), ("mqtt_url", "--mqtt-url"),
             ("mqtt_username", "--mqtt-username"), ("mqtt_cafile", "--mqtt-cafile")]
    if mode == "apply":
        flags += [("lock_timeout", "--lock-timeout"), ("shutdown_timeout", "--shutdown-timeout")]
    if not module.check_mode:
        flags.append(("metrics_file", "--metrics-file"))
    for option, flag in flags:
        if p[option] is not None:
            cmd.extend([flag, p[option]])
    # plan takes the allow flags too: check mode then shows what apply would do with them.
    switches = [("prune", "--prune"), ("force", "--force"), ("allow_restart", "--allow-restart"),
                ("allow_replace", "--allow-replace")]
    cmd.extend(flag for option, flag in switches if p[option])
    return cmd


def _environment(module):
    """The secret goes into the child's environment: /proc/PID/environ is readable by its owner only,
    unlike the command line, which every user sees in ps."""
    p = module.params
    env = {}
    if p["mqtt_password"] is not None:
        env["RECONCILER_MQTT_PASSWORD"] = p["mqtt_password"]
        # The explicit password wins over a file named in the task's environment.
        os.environ.pop("RECONCILER_MQTT_PASSWORD_FILE", None)
    elif p["mqtt_password_file"] is not None:
        env["RECONCILER_MQTT_PASSWORD_FILE"] = p["mqtt_password_file"]
        # The reconciler prefers RECONCILER_MQTT_PASSWORD; the task asked for the file.
        os.environ.pop("RECONCILER_MQTT_PASSWORD", None)
    return env


def _binary(module):
    name = module.params["reconciler_bin"]
    if os.sep in name:
        if not (os.path.isfile(name) and os.access(name, os.X_OK)):
            module.fail_json(msg="reconciler_bin %s is not an executable file" % name, mode=None, recap={})
        return name
    found = module.get_bin_path(name)
    if found is None:
        module.fail_json(msg="%s not found on PATH of the managed host: install the reconciler there "
                             "or set reconciler_bin to its path" % name, mode=None, recap={})
    return found


def main():
    module = AnsibleModule(
        argument_spec=dict(
            paths=dict(type="list", elements="path", required=True),
            state=dict(type="str", choices=["applied", "planned"], default="applied"),
            prune=dict(type="bool", default=False),
            force=dict(type="bool", default=False),
            allow_restart=dict(type="bool", default=False),
            allow_replace=dict(type="bool", default=False),
            scope=dict(type="str"),
            libvirt_uri=dict(type="str"),
            mqtt_url=dict(type="str"),
            mqtt_username=dict(type="str"),
            mqtt_password=dict(type="str", no_log=True),
            mqtt_password_file=dict(type="path", no_log=False),  # a path, not a secret
            mqtt_cafile=dict(type="path"),
            lock_timeout=dict(type="str"),
            shutdown_timeout=dict(type="str"),
            metrics_file=dict(type="path"),
            reconciler_bin=dict(type="str", default="reconciler"),
        ),
        mutually_exclusive=[("mqtt_password", "mqtt_password_file")],
        supports_check_mode=True,
    )
    mode = "plan" if module.check_mode or module.params["state"] == "planned" else "apply"
    binary = _binary(module)
    cmd = _command(module, binary, mode)
    rc, out, err = module.run_command(cmd, environ_update=_environment(module))

    data = None
    if out.strip():
        try:
            data = json.loads(out)
        except ValueError:
            data = None
    if not isinstance(data, dict):
        module.fail_json(msg=err.strip() or "reconciler exited with code %d and printed no JSON" % rc,
                         exit_code=rc, mode=mode, recap={}, stdout=out, stderr=err)
    if "error" in data:
        module.fail_json(msg=str(data["error"]), exit_code=rc, mode=mode, recap={}, stderr=err)

    changes = data.get("changes") or []
    result = dict(changes=changes, summary=data.get("summary") or {}, recap=data.get("recap") or {},
                  orphans=data.get("orphans") or [], mode=mode, exit_code=rc)
    if mode == "plan":
        # Pending = what apply would do; a refused change is a failure, not a pending change.
        done = [c for c in changes if c.get("status") == "planned"]
    else:
        done = [c for c in changes if c.get("status") == "applied"]
    result["changed"] = bool(done)
    if module._diff:
        result["diff"] = [_object_diff(c) for c in done]

    for c in changes:
        if c.get("status") == "skipped":
            module.warn("skipped %s" % _describe(c))
    failed = [c for c in changes if c.get("status") == "failed"]
    if failed or rc not in (0, 2) or (mode == "apply" and rc != 0):
        if failed:
            msg = "; ".join(_describe(c) for c in failed)
        else:
            msg = err.strip() or "reconciler exited with code %d" % rc
        module.fail_json(msg=msg, stderr=err, **result)
    module.exit_json(**result)


if __name__ == "__main__":
    main()
