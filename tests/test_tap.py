# -*- test-case-name: tests.test_tap -*-
"""
Tests for L{fractal.config}, L{fractal.tap} and the C{fractal} twistd plugin.
"""

from __future__ import annotations

import os
import sys

from twisted.application.service import IServiceMaker
from twisted.plugin import getPlugins
from twisted.python import usage
from twisted.python.filepath import FilePath
from twisted.trial.unittest import SynchronousTestCase

import twisted.plugins
from fractal.config import (
    ConfigError,
    FractalConfig,
    loadConfig,
    parseConfig,
    schemaFromOptions,
)
from fractal.tap import DEFAULTS, Options, resolveApplication

SCHEMA = schemaFromOptions(Options)
APP = "examples.mailbox:application"


class SchemaTests(SynchronousTestCase):
    """
    Tests for L{schemaFromOptions}.
    """

    def test_typesFromCoercion(self) -> None:
        """
        A parameter coerced to an integer or a float is a number in the file;
        other parameters are strings; C{--config} and C{--node} are not keys.
        """
        self.assertEqual(SCHEMA["max-open-stores"], int)
        self.assertEqual(SCHEMA["idle-timeout"], float)
        self.assertEqual(SCHEMA["data"], str)
        self.assertEqual(SCHEMA["listen"], str)
        self.assertEqual(SCHEMA["app"], str)
        self.assertNotIn("config", SCHEMA)
        self.assertNotIn("node", SCHEMA)

    def test_flagsAreBooleans(self) -> None:
        """
        A flag is a boolean key.
        """

        class WithFlag(usage.Options):
            optFlags = [["verbose", "v", "Talk more."]]

        self.assertEqual(schemaFromOptions(WithFlag), {"verbose": bool})


class ParseConfigTests(SynchronousTestCase):
    """
    Tests for L{parseConfig}.
    """

    def parse(self, text: str) -> FractalConfig:
        return parseConfig(text, SCHEMA, "cluster.toml")

    def assertConfigError(self, text: str, *fragments: str) -> None:
        """
        Parsing C{text} raises L{ConfigError} whose message names the file
        and contains each fragment.
        """
        error = self.assertRaises(ConfigError, self.parse, text)
        message = str(error)
        self.assertIn("cluster.toml", message)
        for fragment in fragments:
            self.assertIn(fragment, message)

    def test_topLevel(self) -> None:
        """
        Top-level keys are read with their TOML types.
        """
        config = self.parse(
            'app = "examples.mailbox:application"\n'
            "max-open-stores = 40\n"
            "idle-timeout = 3\n"
            'data = "/srv/fractal"\n'
        )
        self.assertEqual(
            config.settings,
            {
                "app": "examples.mailbox:application",
                "max-open-stores": 40,
                "idle-timeout": 3.0,
                "data": "/srv/fractal",
            },
        )
        self.assertEqual(config.nodes, ())
        self.assertEqual(config.source, "cluster.toml")

    def test_nodes(self) -> None:
        """
        Each C{[[node]]} table becomes a L{NodeEntry}, in file order, whose
        settings override the top level in L{FractalConfig.settingsFor}.
        """
        config = self.parse(
            'listen = "tcp:7100"\n'
            "max-open-stores = 10\n"
            "[[node]]\n"
            'id = "a"\n'
            'listen = "tcp:7101:interface=127.0.0.1"\n'
            'client = "tcp:host=127.0.0.1:port=7101"\n'
            'peer = "tcp:host=127.0.0.1:port=7201"\n'
            "[[node]]\n"
            'id = "b"\n'
            'data = "/srv/b"\n'
        )
        self.assertEqual([entry.id for entry in config.nodes], ["a", "b"])
        a = config.node("a")
        self.assertEqual(a.client, "tcp:host=127.0.0.1:port=7101")
        self.assertEqual(a.peer, "tcp:host=127.0.0.1:port=7201")
        self.assertIsNone(config.node("b").client)
        self.assertEqual(
            config.settingsFor("a"),
            {
                "listen": "tcp:7101:interface=127.0.0.1",
                "max-open-stores": 10,
                "client": "tcp:host=127.0.0.1:port=7101",
                "peer": "tcp:host=127.0.0.1:port=7201",
            },
        )
        self.assertEqual(
            config.settingsFor("b"),
            {"listen": "tcp:7100", "max-open-stores": 10, "data": "/srv/b"},
        )
        self.assertEqual(config.settingsFor(None), {"listen": "tcp:7100", "max-open-stores": 10})

    def test_unknownNode(self) -> None:
        """
        Asking for a node the file does not describe names the known ones.
        """
        config = self.parse('[[node]]\nid = "a"\n')
        error = self.assertRaises(ConfigError, config.node, "zz")
        self.assertIn("'zz'", str(error))
        self.assertIn("'a'", str(error))

    def test_unknownTopLevelKey(self) -> None:
        """
        A top-level key that is no option is refused, with the nearest known
        key suggested.
        """
        self.assertConfigError('lisen = "tcp:1"\n', "unknown key 'lisen'", "'listen'")

    def test_underscoreSpelling(self) -> None:
        """
        Keys are spelled as the long options are; the underscore spelling is
        refused with the right spelling suggested.
        """
        self.assertConfigError(
            "max_open_stores = 3\n", "unknown key 'max_open_stores'", "'max-open-stores'"
        )

    def test_unknownNodeKey(self) -> None:
        """
        An unknown key in a C{[[node]]} table is refused, naming the node.
        """
        self.assertConfigError(
            '[[node]]\nid = "a"\nport = 7100\n', "[[node]] 'a'", "unknown key", "'port'"
        )

    def test_nodeOnlyKeysAtTopLevel(self) -> None:
        """
        C{client} and C{peer} describe one node and are refused at the top
        level.
        """
        self.assertConfigError('client = "tcp:host=x:port=1"\n', "unknown key 'client'")

    def test_wrongType(self) -> None:
        """
        A value of the wrong TOML type is refused, naming the expected type.
        """
        self.assertConfigError('max-open-stores = "many"\n', "'max-open-stores'", "an integer")
        self.assertConfigError("max-open-stores = true\n", "an integer")
        self.assertConfigError("listen = 7100\n", "'listen'", "a string")
        self.assertConfigError('[[node]]\nid = "a"\nclient = 1\n', "'client'", "a string")

    def test_nodeWithoutId(self) -> None:
        """
        Every C{[[node]]} needs a non-empty string id.
        """
        self.assertConfigError('[[node]]\nlisten = "tcp:1"\n', "[[node]] #1", "'id'")
        self.assertConfigError('[[node]]\nid = ""\n', "'id'")
        self.assertConfigError("[[node]]\nid = 3\n", "'id'")

    def test_duplicateId(self) -> None:
        """
        Two C{[[node]]} tables may not share an id.
        """
        self.assertConfigError(
            '[[node]]\nid = "a"\n[[node]]\nid = "a"\n', "[[node]] 'a'", "more than one"
        )

    def test_nodeNotAnArray(self) -> None:
        """
        C{node} must be an array of tables.
        """
        self.assertConfigError('node = "a"\n', "array of tables")
        self.assertConfigError('[node]\nid = "a"\n', "array of tables")

    def test_notToml(self) -> None:
        """
        Text that is not TOML is refused with the parser's explanation.
        """
        self.assertConfigError("listen = \n", "not valid TOML")


class LoadConfigTests(SynchronousTestCase):
    """
    Tests for L{loadConfig}.
    """

    def test_load(self) -> None:
        """
        A file is read and parsed, and its path is its source.
        """
        path = FilePath(self.mktemp())
        path.setContent(b'data = "d"\n')
        config = loadConfig(path, SCHEMA)
        self.assertEqual(config.settings, {"data": "d"})
        self.assertEqual(config.source, path.path)

    def test_missing(self) -> None:
        """
        A file that cannot be read is a L{ConfigError} naming it.
        """
        path = FilePath(self.mktemp())
        error = self.assertRaises(ConfigError, loadConfig, path, SCHEMA)
        self.assertIn(path.path, str(error))
        self.assertIn("cannot read", str(error))

    def test_notUTF8(self) -> None:
        """
        A file that is not UTF-8 is refused.
        """
        path = FilePath(self.mktemp())
        path.setContent(b'data = "\xff"\n')
        error = self.assertRaises(ConfigError, loadConfig, path, SCHEMA)
        self.assertIn("not UTF-8", str(error))


class OptionsTests(SynchronousTestCase):
    """
    Tests for L{Options}: the command line, the configuration file, and their
    precedence.
    """

    def configFile(self, text: str) -> str:
        path = FilePath(self.mktemp())
        path.setContent(text.encode("utf-8"))
        return path.path

    def parse(self, *argv: str) -> Options:
        options = Options()
        options.parseOptions(list(argv))
        return options

    def test_defaults(self) -> None:
        """
        With only C{--app}, the embedded defaults apply: data in
        C{./fractal-data}, AMP on loopback port 7100, node C{n1}, and no
        explicit store limit.
        """
        options = self.parse("--app", APP)
        self.assertEqual(options["data"], "./fractal-data")
        self.assertEqual(options["listen"], "tcp:7100:interface=127.0.0.1")
        self.assertEqual(options["node"], "n1")
        self.assertIsNone(options["max-open-stores"])
        self.assertIsNone(options["idle-timeout"])
        self.assertIsNone(options.config)
        self.assertIsNone(options.nodeEntry)
        from examples.mailbox import application

        self.assertIs(options.application, application)
        self.assertEqual(DEFAULTS["data"], "./fractal-data")

    def test_commandLine(self) -> None:
        """
        Long options set their values, numbers coerced.
        """
        options = self.parse(
            "--app",
            APP,
            "--data",
            "/tmp/x",
            "--listen",
            "tcp:0",
            "--max-open-stores",
            "12",
            "--idle-timeout",
            "2.5",
            "--node",
            "n7",
        )
        self.assertEqual(
            (
                options["data"],
                options["listen"],
                options["max-open-stores"],
                options["idle-timeout"],
                options["node"],
            ),
            ("/tmp/x", "tcp:0", 12, 2.5, "n7"),
        )

    def test_badNumbers(self) -> None:
        """
        A store limit or idle timeout that is not a positive number is a usage
        error that names the option.
        """
        for bad in ["0", "-3", "many", "1.5"]:
            error = self.assertRaises(
                usage.UsageError, self.parse, "--app", APP, "--max-open-stores", bad
            )
            self.assertIn("--max-open-stores", str(error))
        error = self.assertRaises(
            usage.UsageError, self.parse, "--app", APP, "--idle-timeout", "0"
        )
        self.assertIn("--idle-timeout", str(error))

    def test_appRequired(self) -> None:
        """
        Without C{--app} (on the command line or in the file) there is nothing
        to serve: a usage error says how to name one.
        """
        error = self.assertRaises(usage.UsageError, self.parse)
        self.assertIn("--app module:attribute", str(error))

    def test_configTopLevel(self) -> None:
        """
        The file's top-level values apply where the command line is silent,
        including the application.
        """
        path = self.configFile(
            f'app = "{APP}"\ndata = "/srv/d"\nmax-open-stores = 30\nidle-timeout = 9\n'
        )
        options = self.parse("--config", path)
        self.assertEqual(options["data"], "/srv/d")
        self.assertEqual(options["max-open-stores"], 30)
        self.assertEqual(options["idle-timeout"], 9.0)
        self.assertEqual(options["listen"], DEFAULTS["listen"])
        self.assertEqual(options["node"], "n1")
        self.assertIsNotNone(options.config)

    def test_commandLineOverridesFile(self) -> None:
        """
        A value given on the command line wins over the file's.
        """
        path = self.configFile('data = "/srv/d"\nmax-open-stores = 30\n')
        options = self.parse(
            "--config", path, "--app", APP, "--data", "/cli", "--max-open-stores", "5"
        )
        self.assertEqual((options["data"], options["max-open-stores"]), ("/cli", 5))

    def test_nodeOverridesTopLevel(self) -> None:
        """
        The chosen node's table overrides the top level; other nodes' tables
        are ignored; the node's entry is available for the topology.
        """
        path = self.configFile(
            f'app = "{APP}"\n'
            'listen = "tcp:7000"\n'
            'data = "/srv/top"\n'
            '[[node]]\nid = "a"\nlisten = "tcp:7001"\n'
            '[[node]]\nid = "b"\nlisten = "tcp:7002"\ndata = "/srv/b"\n'
            'client = "tcp:host=127.0.0.1:port=7002"\n'
        )
        options = self.parse("--config", path, "--node", "b")
        self.assertEqual(
            (options["listen"], options["data"], options["node"]),
            ("tcp:7002", "/srv/b", "b"),
        )
        assert options.nodeEntry is not None
        self.assertEqual(options.nodeEntry.client, "tcp:host=127.0.0.1:port=7002")
        options = self.parse("--config", path, "--node", "a", "--listen", "tcp:9")
        self.assertEqual((options["listen"], options["data"]), ("tcp:9", "/srv/top"))

    def test_onlyNodeChosen(self) -> None:
        """
        A file with one C{[[node]]} runs that node without C{--node}.
        """
        path = self.configFile(f'app = "{APP}"\n[[node]]\nid = "solo"\nlisten = "tcp:1"\n')
        options = self.parse("--config", path)
        self.assertEqual((options["node"], options["listen"]), ("solo", "tcp:1"))

    def test_severalNodesNeedChoice(self) -> None:
        """
        A file with several nodes needs C{--node}; the error lists them.
        """
        path = self.configFile(f'app = "{APP}"\n[[node]]\nid = "a"\n[[node]]\nid = "b"\n')
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path)
        self.assertIn("--node (a, b)", str(error))

    def test_unknownNodeChosen(self) -> None:
        """
        C{--node} naming no C{[[node]]} of the file is a usage error.
        """
        path = self.configFile(f'app = "{APP}"\n[[node]]\nid = "a"\n')
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path, "--node", "q")
        self.assertIn("no [[node]] with id 'q'", str(error))

    def test_nodeWithoutTables(self) -> None:
        """
        With a file that has no C{[[node]]} tables, C{--node} just names the
        node.
        """
        path = self.configFile(f'app = "{APP}"\ndata = "/srv/d"\n')
        options = self.parse("--config", path, "--node", "edge7")
        self.assertEqual((options["node"], options["data"]), ("edge7", "/srv/d"))
        self.assertIsNone(options.nodeEntry)

    def test_badFile(self) -> None:
        """
        A bad configuration file is a usage error naming the file and key.
        """
        path = self.configFile("colour = 1\n")
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path, "--app", APP)
        self.assertIn(path, str(error))
        self.assertIn("'colour'", str(error))
        error = self.assertRaises(
            usage.UsageError, self.parse, "--config", self.mktemp(), "--app", APP
        )
        self.assertIn("cannot read", str(error))

    def test_fileValueChecked(self) -> None:
        """
        A value from the file goes through the option's own check.
        """
        path = self.configFile("max-open-stores = 0\n")
        error = self.assertRaises(usage.UsageError, self.parse, "--config", path, "--app", APP)
        self.assertIn("max-open-stores", str(error))
        self.assertIn("positive", str(error))


class ResolveApplicationTests(SynchronousTestCase):
    """
    Tests for L{resolveApplication}.
    """

    def test_resolves(self) -> None:
        """
        C{module:attribute} names an application.
        """
        from examples.mailbox import application

        self.assertIs(resolveApplication(APP), application)

    def test_malformed(self) -> None:
        """
        A name without both parts is refused with an example.
        """
        for bad in ["examples.mailbox", ":application", "examples.mailbox:"]:
            error = self.assertRaises(usage.UsageError, resolveApplication, bad)
            self.assertIn("module:attribute", str(error))

    def test_missingModule(self) -> None:
        """
        A module that does not exist is named in the error.
        """
        error = self.assertRaises(usage.UsageError, resolveApplication, "nosuchmod_q:app")
        self.assertIn("no module named 'nosuchmod_q'", str(error))

    def test_missingAttribute(self) -> None:
        """
        A missing attribute is named, with the module's applications listed.
        """
        error = self.assertRaises(usage.UsageError, resolveApplication, "examples.mailbox:app")
        self.assertIn("no attribute 'app'", str(error))
        self.assertIn("its applications: application", str(error))

    def test_notAnApplication(self) -> None:
        """
        An attribute that is not an L{Application} is refused.
        """
        error = self.assertRaises(usage.UsageError, resolveApplication, "examples.mailbox:Deliver")
        self.assertIn("not a fractal.app.Application", str(error))

    def writeModule(self, directory: FilePath[str], name: str, source: str) -> None:
        directory.makedirs(ignoreExistingDirectory=True)
        directory.child(name + ".py").setContent(source.encode("utf-8"))
        self.addCleanup(sys.modules.pop, name, None)

    def inDirectory(self, directory: FilePath[str]) -> None:
        """
        Run the rest of the test in C{directory}, with neither it nor C{""}
        on C{sys.path}, as under the C{twistd} script.
        """
        here = os.getcwd()
        os.chdir(directory.path)
        self.addCleanup(os.chdir, here)
        self.patch(sys, "path", [p for p in sys.path if p not in ("", here, directory.path)])

    def test_currentDirectory(self) -> None:
        """
        A module in the current directory is found even when the current
        directory is not on C{sys.path}.
        """
        directory = FilePath(self.mktemp())
        self.writeModule(
            directory,
            "tapcwdapp",
            f"from {APP.split(':')[0]} import application as mine\n",
        )
        self.inDirectory(directory)
        from examples.mailbox import application

        self.assertIs(resolveApplication("tapcwdapp:mine"), application)
        self.assertIn(directory.path, sys.path)

    def test_brokenDependency(self) -> None:
        """
        A module that fails to import one of its own dependencies is reported
        as such, not as a missing module.
        """
        directory = FilePath(self.mktemp())
        self.writeModule(directory, "tapbrokenapp", "import nosuchdependency_q\n")
        self.inDirectory(directory)
        error = self.assertRaises(usage.UsageError, resolveApplication, "tapbrokenapp:x")
        self.assertIn("importing 'tapbrokenapp' failed", str(error))
        self.assertIn("nosuchdependency_q", str(error))


class PluginTests(SynchronousTestCase):
    """
    Tests for C{twisted/plugins/fractal_plugin.py}.
    """

    def fractalMakers(self) -> list[IServiceMaker]:
        return [m for m in getPlugins(IServiceMaker) if m.tapname == "fractal"]

    def test_found(self) -> None:
        """
        Twisted's plugin search finds exactly one C{fractal} service maker,
        and it builds its options and service from L{fractal.tap}.
        """
        makers = self.fractalMakers()
        self.assertEqual(len(makers), 1)
        import fractal.tap

        self.assertIs(makers[0].options, fractal.tap.Options)
        self.assertIs(makers[0].makeService, fractal.tap.makeService)

    def test_corruptCache(self) -> None:
        """
        A corrupt C{dropin.cache} beside the plugin does not hide it: the
        cache is rebuilt.
        """
        here = FilePath(__file__).parent().parent().descendant(["twisted", "plugins"])
        copy = FilePath(self.mktemp()).descendant(["twisted", "plugins"])
        copy.makedirs()
        here.child("fractal_plugin.py").copyTo(copy.child("fractal_plugin.py"))
        copy.child("dropin.cache").setContent(b"\x80\x04 not a pickle")
        os.utime(copy.child("dropin.cache").path, (2**31, 2**31))
        self.patch(twisted.plugins, "__path__", [copy.path])
        makers = self.fractalMakers()
        self.assertEqual([m.module for m in makers], ["fractal.tap"])


class HelpTests(SynchronousTestCase):
    """
    C{twistd fractal --help} and the option list of C{docs/deploying.rst}.
    """

    def test_everyOptionDocumented(self) -> None:
        """
        Every long option of L{Options} is named in C{docs/deploying.rst}'s
        list of options, as C{``--name}.
        """
        docs = FilePath(__file__).parent().sibling("docs").child("deploying.rst")
        text = docs.getContent().decode("utf-8")
        names = [p[0] for p in Options.optParameters] + [f[0] for f in Options.optFlags]
        missing = [name for name in names if f"``--{name}" not in text]
        self.assertEqual(missing, [])

    def test_helpSentences(self) -> None:
        """
        The help of an option whose value is checked ends its own sentence
        once before the check's description, not with C{".."}.
        """
        usageText = Options().getUsage(width=200)
        self.assertIn("A positive number.", usageText)
        self.assertNotIn("..", usageText)
