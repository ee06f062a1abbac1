"""PACS ▸ Settings…: the nodes we query, retrieve from and send to, and our listener.

Edits a copy of the configuration and writes it with ``ich_model.pacs.save_config`` (which
validates it and makes the file owner-only). Each field's problem is shown as it is typed,
in the engine's words ("port must be an integer in 1..65535. Received: port=0"), and
"Test (C-ECHO)" checks the node as it stands in the form, on a worker thread.
"""

from __future__ import annotations

import html
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PySide6.QtCore import Qt, Signal, Slot
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QListWidget,
    QListWidgetItem,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from viewer.qt_pacs_tasks import TaskHandle, TaskRunner
from viewer.qt_theme import ERROR, MUTED

if TYPE_CHECKING:
    from ich_model.pacs import PacsConfig, PacsNode

log = logging.getLogger(__name__)

OK_COLOUR = "#6fcf73"
RETRIEVE_CHOICES = (
    ("C-GET (nothing to set up at the PACS but our AE title)", "get"),
    ("C-MOVE to our listener (the PACS must know its AE title and port)", "move"),
)


def _path_or_none(text: str) -> Path | None:
    text = text.strip()
    return Path(text).expanduser() if text else None


class _FileField(QWidget):
    """A path line edit with a Browse… button."""

    def __init__(self, caption: str, parent: QWidget | None = None, folder: bool = False) -> None:
        super().__init__(parent)
        row = QHBoxLayout(self)
        row.setContentsMargins(0, 0, 0, 0)
        self.edit = QLineEdit()
        self.button = QPushButton("Browse…")
        self._caption = caption
        self._folder = folder
        self.button.clicked.connect(self._browse)
        row.addWidget(self.edit, 1)
        row.addWidget(self.button)

    def _browse(self) -> None:
        start = self.edit.text() or str(Path.home())
        if self._folder:
            path = QFileDialog.getExistingDirectory(self, self._caption, start)
        else:
            path, _ = QFileDialog.getOpenFileName(self, self._caption, start)
        if path:
            self.edit.setText(path)


class QtPacsSettingsDialog(QDialog):
    """Add, edit and remove PACS nodes; the listener's settings; C-ECHO a node."""

    saved = Signal(object)  # PacsConfig
    echoFinished = Signal(bool, str)  # answered, message

    def __init__(self, config_path: Path, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        from ich_model import pacs

        self._pacs = pacs
        self.config_path = config_path
        self.setWindowTitle("PACS settings")
        self.resize(860, 640)
        self.runner = TaskRunner("pacs-echo", self)
        self._echo: TaskHandle | None = None
        self._nodes: list[dict[str, Any]] = []
        self._current = -1
        self._loading = False
        load_problem = ""
        try:
            config = pacs.load_config(config_path)
        except pacs.PacsConfigError as exc:
            config = pacs.PacsConfig()
            load_problem = f"{exc}. Saving replaces that file."
        self._listener = config.listener
        self._build()
        self.load_label.setText(load_problem)
        self.load_label.setVisible(bool(load_problem))
        for node in config.nodes:
            self._nodes.append(node.to_dict())
            self.node_list.addItem(QListWidgetItem(node.name))
        self._set_listener_form(config.listener)
        if self._nodes:
            self.node_list.setCurrentRow(0)
        else:
            self._show_node(-1)

    # ------------------------------------------------------------------ building

    def _build(self) -> None:
        layout = QVBoxLayout(self)
        self.load_label = QLabel("")
        self.load_label.setWordWrap(True)
        self.load_label.setStyleSheet(f"color: {ERROR};")
        layout.addWidget(self.load_label)
        where = QLabel(f"Saved in {self.config_path}")
        where.setStyleSheet(f"color: {MUTED};")
        where.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        layout.addWidget(where)

        nodes_box = QGroupBox("PACS nodes")
        nodes_row = QHBoxLayout(nodes_box)
        left = QVBoxLayout()
        self.node_list = QListWidget()
        self.node_list.setMaximumWidth(220)
        self.node_list.currentRowChanged.connect(self._on_row_changed)
        left.addWidget(self.node_list, 1)
        buttons = QHBoxLayout()
        self.add_button = QPushButton("Add")
        self.add_button.clicked.connect(self.add_node)
        self.remove_button = QPushButton("Remove")
        self.remove_button.clicked.connect(self.remove_current)
        buttons.addWidget(self.add_button)
        buttons.addWidget(self.remove_button)
        left.addLayout(buttons)
        nodes_row.addLayout(left)

        self.node_form = QWidget()
        form = QFormLayout(self.node_form)
        form.setFieldGrowthPolicy(QFormLayout.FieldGrowthPolicy.ExpandingFieldsGrow)
        self.name_edit = QLineEdit()
        self.ae_edit = QLineEdit()
        self.ae_edit.setMaxLength(16)
        self.host_edit = QLineEdit()
        self.port_box = QSpinBox()
        self.port_box.setRange(1, 65535)
        self.calling_edit = QLineEdit()
        self.calling_edit.setMaxLength(16)
        self.calling_edit.setToolTip(
            "Our AE title when we call this node; the PACS must know it with this machine's "
            "address before it answers queries and retrievals"
        )
        self.method_box = QComboBox()
        for text, value in RETRIEVE_CHOICES:
            self.method_box.addItem(text, value)
        self.timeout_box = QDoubleSpinBox()
        self.timeout_box.setRange(1.0, 3600.0)
        self.timeout_box.setDecimals(0)
        self.timeout_box.setSuffix(" s")
        self.tls_box = QGroupBox("TLS")
        self.tls_box.setCheckable(True)
        tls_form = QFormLayout(self.tls_box)
        self.ca_field = _FileField("CA certificate of the PACS")
        self.ca_field.edit.setPlaceholderText("empty: the system's trusted CAs")
        self.cert_field = _FileField("Our client certificate")
        self.cert_field.edit.setPlaceholderText("only when the PACS wants a client certificate")
        self.key_field = _FileField("Our private key")
        tls_form.addRow("CA file", self.ca_field)
        tls_form.addRow("Client certificate", self.cert_field)
        tls_form.addRow("Client key", self.key_field)
        form.addRow("Name", self.name_edit)
        form.addRow("AE title", self.ae_edit)
        form.addRow("Host", self.host_edit)
        form.addRow("Port", self.port_box)
        form.addRow("Our AE title (calling)", self.calling_edit)
        form.addRow("Retrieve with", self.method_box)
        form.addRow("Timeout", self.timeout_box)
        form.addRow(self.tls_box)
        echo_row = QHBoxLayout()
        self.echo_button = QPushButton("Test (C-ECHO)")
        self.echo_button.clicked.connect(self.test_echo)
        self.echo_label = QLabel("")
        self.echo_label.setWordWrap(True)
        self.echo_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        echo_row.addWidget(self.echo_button)
        echo_row.addWidget(self.echo_label, 1)
        form.addRow(echo_row)
        self.node_problems = QLabel("")
        self.node_problems.setWordWrap(True)
        self.node_problems.setStyleSheet(f"color: {ERROR};")
        form.addRow(self.node_problems)
        nodes_row.addWidget(self.node_form, 1)
        self.empty_label = QLabel("No PACS yet: Add one.")
        self.empty_label.setStyleSheet(f"color: {MUTED};")
        self.empty_label.setAlignment(Qt.AlignmentFlag.AlignCenter)
        nodes_row.addWidget(self.empty_label, 1)
        layout.addWidget(nodes_box, 1)

        for edit in (self.name_edit, self.ae_edit, self.host_edit, self.calling_edit):
            edit.textEdited.connect(self._on_edited)
        for field in (self.ca_field, self.cert_field, self.key_field):
            field.edit.textChanged.connect(self._on_edited)
        self.port_box.valueChanged.connect(self._on_edited)
        self.timeout_box.valueChanged.connect(self._on_edited)
        self.method_box.currentIndexChanged.connect(self._on_edited)
        self.tls_box.toggled.connect(self._on_edited)

        listener_box = QGroupBox("Our listener (C-STORE SCP: studies pushed to us, C-MOVE target)")
        lform = QFormLayout(listener_box)
        self.listen_enabled = QCheckBox("Start it when the viewer starts")
        self.listen_ae = QLineEdit()
        self.listen_ae.setMaxLength(16)
        self.listen_port = QSpinBox()
        self.listen_port.setRange(1, 65535)
        self.listen_bind = QLineEdit()
        self.listen_bind.setToolTip(
            "127.0.0.1 accepts this machine only; a PACS elsewhere needs 0.0.0.0 "
            "(or this machine's address)"
        )
        self.listen_store = _FileField("Local store for received and retrieved studies", None, True)
        self.listen_store.edit.setPlaceholderText(str(self._pacs.default_store_dir()))
        self.listen_timeout = QDoubleSpinBox()
        self.listen_timeout.setRange(1.0, 3600.0)
        self.listen_timeout.setDecimals(0)
        self.listen_timeout.setSuffix(" s")
        self.listen_timeout.setToolTip("A series is complete when nothing arrived for this long")
        lform.addRow(self.listen_enabled)
        lform.addRow("AE title", self.listen_ae)
        lform.addRow("Port", self.listen_port)
        lform.addRow("Listen on", self.listen_bind)
        lform.addRow("Store folder", self.listen_store)
        lform.addRow("Series complete after", self.listen_timeout)
        layout.addWidget(listener_box)

        self.save_problems = QLabel("")
        self.save_problems.setWordWrap(True)
        self.save_problems.setStyleSheet(f"color: {ERROR};")
        layout.addWidget(self.save_problems)
        box = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Save | QDialogButtonBox.StandardButton.Cancel
        )
        box.accepted.connect(self.save)
        box.rejected.connect(self.reject)
        layout.addWidget(box)

    # ------------------------------------------------------------------ node form

    def _on_row_changed(self, row: int) -> None:
        if not self._loading:
            self._commit_form()
            self._show_node(row)

    def _show_node(self, row: int) -> None:
        self._current = row
        has = 0 <= row < len(self._nodes)
        self.node_form.setVisible(has)
        self.empty_label.setVisible(not has)
        self.remove_button.setEnabled(has)
        self.echo_label.setText("")
        if not has:
            return
        d = self._nodes[row]
        self._loading = True
        try:
            self.name_edit.setText(str(d.get("name", "")))
            self.ae_edit.setText(str(d.get("ae_title", "")))
            self.host_edit.setText(str(d.get("host", "")))
            self.port_box.setValue(int(d.get("port") or 104))
            self.calling_edit.setText(str(d.get("calling_ae_title", "")))
            self.method_box.setCurrentIndex(
                max(0, self.method_box.findData(d.get("retrieve_method")))
            )
            self.timeout_box.setValue(float(d.get("timeout_s") or 30.0))
            self.tls_box.setChecked(bool(d.get("tls")))
            self.ca_field.edit.setText(str(d.get("tls_ca_file") or ""))
            self.cert_field.edit.setText(str(d.get("tls_cert_file") or ""))
            self.key_field.edit.setText(str(d.get("tls_key_file") or ""))
        finally:
            self._loading = False
        self._show_problems()

    def _form_dict(self) -> dict[str, Any]:
        tls = self.tls_box.isChecked()

        def file(field: _FileField) -> str | None:
            p = _path_or_none(field.edit.text())
            return str(p) if tls and p is not None else None

        return {
            "name": self.name_edit.text().strip(),
            "ae_title": self.ae_edit.text().strip(),
            "host": self.host_edit.text().strip(),
            "port": int(self.port_box.value()),
            "calling_ae_title": self.calling_edit.text().strip(),
            "tls": tls,
            "tls_ca_file": file(self.ca_field),
            "tls_cert_file": file(self.cert_field),
            "tls_key_file": file(self.key_field),
            "timeout_s": float(self.timeout_box.value()),
            "retrieve_method": str(self.method_box.currentData()),
        }

    def _commit_form(self) -> None:
        if 0 <= self._current < len(self._nodes):
            self._nodes[self._current] = self._form_dict()
            item = self.node_list.item(self._current)
            if item is not None:
                item.setText(self._nodes[self._current]["name"] or "(unnamed)")

    def _on_edited(self, *_: object) -> None:
        if self._loading:
            return
        self._commit_form()
        self._show_problems()

    def form_node(self) -> PacsNode:
        """The node being edited, as the form stands (it may have problems)."""
        return self._pacs.PacsNode.from_dict(self._form_dict())

    def _show_problems(self) -> None:
        if not 0 <= self._current < len(self._nodes):
            self.node_problems.setText("")
            return
        problems = self.form_node().problems(check_files=True)
        self.node_problems.setText("\n".join(problems))
        echoing = self._echo is not None and self._echo.running
        self.echo_button.setEnabled(not problems and not echoing)

    def add_node(self) -> None:
        self._commit_form()
        names = {d["name"] for d in self._nodes}
        name = next(f"PACS {k}" for k in range(1, 1000) if f"PACS {k}" not in names)
        node = self._pacs.PacsNode(
            name, "PACS", "", 104, calling_ae_title=self._listener.ae_title or "ICHSO"
        )
        self._nodes.append(node.to_dict())
        self.node_list.addItem(QListWidgetItem(name))
        self.node_list.setCurrentRow(len(self._nodes) - 1)
        self.name_edit.setFocus()
        self.name_edit.selectAll()

    def remove_current(self) -> None:
        row = self._current
        if not 0 <= row < len(self._nodes):
            return
        self._loading = True
        try:
            del self._nodes[row]
            self.node_list.takeItem(row)
        finally:
            self._loading = False
        self._current = -1
        self._show_node(self.node_list.currentRow())

    # ------------------------------------------------------------------ listener form

    def _set_listener_form(self, s: Any) -> None:
        self.listen_enabled.setChecked(bool(s.enabled))
        self.listen_ae.setText(s.ae_title)
        self.listen_port.setValue(int(s.port))
        self.listen_bind.setText(s.bind_address)
        self.listen_store.edit.setText(str(s.store_dir) if s.store_dir else "")
        self.listen_timeout.setValue(float(s.series_timeout_s))

    def _listener_settings(self) -> Any:
        return replace(
            self._listener,
            enabled=self.listen_enabled.isChecked(),
            ae_title=self.listen_ae.text().strip(),
            port=int(self.listen_port.value()),
            bind_address=self.listen_bind.text().strip(),
            store_dir=_path_or_none(self.listen_store.edit.text()),
            series_timeout_s=float(self.listen_timeout.value()),
        )

    # ------------------------------------------------------------------ saving

    def config(self) -> PacsConfig:
        """The configuration as the dialog stands (not validated)."""
        self._commit_form()
        nodes = tuple(self._pacs.PacsNode.from_dict(d) for d in self._nodes)
        return self._pacs.PacsConfig(nodes, self._listener_settings())

    def save(self) -> bool:
        """Validate and write; on a problem, say which node and field, and stay open."""
        try:
            config = self.config()
            problems = config.problems(check_files=False)
            if problems:
                raise self._pacs.PacsConfigError("; ".join(problems))
            path = self._pacs.save_config(config, self.config_path)
        except (self._pacs.PacsConfigError, OSError) as exc:
            self.save_problems.setText(f"Not saved: {exc}")
            log.warning("PACS settings not saved: %s", exc)
            return False
        self.save_problems.setText("")
        log.info("PACS settings saved to %s (%d node(s))", path, len(config.nodes))
        self.saved.emit(config)
        self.accept()
        return True

    # ------------------------------------------------------------------ C-ECHO

    def test_echo(self) -> TaskHandle | None:
        """C-ECHO the node in the form, on a worker thread."""
        node = self.form_node()
        problems = node.problems(check_files=True)
        if problems:
            self._echo_result(False, f"PACS {node.name!r}: " + "; ".join(problems))
            return None
        if self._echo is not None and self._echo.running:
            return self._echo
        pacs = self._pacs
        self.echo_button.setEnabled(False)
        self.echo_label.setStyleSheet(f"color: {MUTED};")
        self.echo_label.setText(f"Calling {node.ae_title}@{node.host}:{node.port}…")
        handle = self.runner.start(lambda _p, _c: pacs.echo(node), f"C-ECHO of PACS {node.name!r}")
        handle.finished.connect(
            lambda seconds: self._echo_result(
                True, f"✓ {node.name} answered C-ECHO in {1000 * float(seconds):.0f} ms"
            )
        )
        handle.errored.connect(lambda message: self._echo_result(False, f"✗ {message}"))
        handle.ended.connect(lambda: self.echo_button.setEnabled(True))
        self._echo = handle
        return handle

    @Slot(bool, str)
    def _echo_result(self, ok: bool, message: str) -> None:
        self.echo_label.setStyleSheet(f"color: {OK_COLOUR if ok else ERROR};")
        self.echo_label.setText(message)
        self.echo_label.setToolTip(html.escape(message))
        self.echoFinished.emit(ok, message)

    def shutdown(self) -> None:
        self.runner.shutdown()

    def done(self, result: int) -> None:
        self.runner.cancel_all()
        super().done(result)
