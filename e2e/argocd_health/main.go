// argocd-health runs an Argo CD resource health script (health.lua) the way an Argo CD application
// controller runs a `resource.customizations.health.<group>_<kind>` entry of argocd-cm, so the
// scripts in charts/slmfleet/argocd/ are tested under the interpreter and library set they meet in
// production, not under a stock Lua.
//
// What is reproduced, from reading Argo CD's util/lua/lua.go (runLuaWithResourceActionParameters,
// ExecuteHealthLua, decodeValue) at argoproj/argo-cd 37ee0097 (gopher-lua v1.1.2 in its go.mod):
//   - the state is created with SkipOpenLibs unless useOpenLibs is set for the kind (false by default
//     for argocd-cm entries; only Argo CD's built-in scripts get true), then exactly these are opened:
//     package, base, table, and a restricted os that is not a global: only `require("os")` reaches
//     it (time and date there; this harness offers time only, so it is stricter, never laxer).
//     string, math, coroutine, io, channel and debug are absent: `string.find`, `s:sub(...)`,
//     `math.max` fail;
//   - a 1 s execution deadline (the state's context);
//   - the `obj` global: the object decoded as JSON (numbers float64 or int64) and converted to
//     nested tables: maps to hash tables, lists to array tables (appending skips nils), numbers to
//     numbers, json.Number to strings, anything else to nil;
//   - the result: the value on top of the stack; a table is encoded to JSON (layeh.com/gopher-json,
//     as Argo CD does) and decoded into {status, message}; a table that encodes as an array (empty)
//     gives an empty status; a status outside Healthy/Progressing/Degraded/Suspended/Missing/Unknown
//     becomes Unknown "Lua returned an invalid health status"; nil gives an empty status; any other
//     type is an error.
//
// Usage:
//
//	argocd-health [--open-libs] run  SCRIPT [OBJECT]   OBJECT (YAML or JSON; stdin when absent or "-")
//	    prints {"status": ..., "message": ...}; a script error exits 2 with the error on stderr
//	argocd-health [--open-libs] test DIR               DIR holds health.lua and health_test.yaml
//	    (Argo CD's resource_customizations layout: tests: [{healthStatus: {status, message},
//	    inputPath: testdata/x.yaml}]); prints one JSON line per test; exits 1 on any mismatch
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"time"

	lua "github.com/yuin/gopher-lua"
	luajson "layeh.com/gopher-json"
	"sigs.k8s.io/yaml"
)

// Health is Argo CD's health.HealthStatus on the wire.
type Health struct {
	Status  string `json:"status,omitempty"`
	Message string `json:"message,omitempty"`
}

var validStatuses = map[string]bool{
	"Healthy": true, "Progressing": true, "Degraded": true, "Suspended": true, "Missing": true, "Unknown": true,
}

const scriptDeadline = time.Second

// newState creates the Lua state with the libraries Argo CD opens for health scripts.
func newState(openLibs bool) *lua.LState {
	l := lua.NewState(lua.Options{SkipOpenLibs: !openLibs})
	openers := []struct {
		name string
		open lua.LGFunction
	}{
		{lua.LoadLibName, lua.OpenPackage},
		{lua.BaseLibName, lua.OpenBase},
		{lua.TabLibName, lua.OpenTable},
	}
	for _, o := range openers {
		if err := l.CallByParam(lua.P{Fn: l.NewFunction(o.open), NRet: 0, Protect: true}, lua.LString(o.name)); err != nil {
			panic(err)
		}
	}
	// The restricted os: reachable through require only (no `os` global unless openLibs).
	l.PreloadModule(lua.OsLibName, func(l *lua.LState) int {
		mod := l.NewTable()
		mod.RawSetString("time", l.NewFunction(func(l *lua.LState) int {
			l.Push(lua.LNumber(time.Now().Unix()))
			return 1
		}))
		l.Push(mod)
		return 1
	})
	return l
}

// toLua converts a decoded JSON value into Lua values as Argo CD builds its `obj` global.
func toLua(l *lua.LState, v any) lua.LValue {
	switch x := v.(type) {
	case nil:
		return lua.LNil
	case bool:
		return lua.LBool(x)
	case string:
		return lua.LString(x)
	case json.Number:
		return lua.LString(string(x))
	case float64:
		return lua.LNumber(x)
	case int:
		return lua.LNumber(x)
	case int32:
		return lua.LNumber(x)
	case int64:
		return lua.LNumber(x)
	case []any:
		t := l.CreateTable(len(x), 0)
		for _, item := range x {
			t.Append(toLua(l, item))
		}
		return t
	case map[string]any:
		t := l.CreateTable(0, len(x))
		for k, item := range x {
			t.RawSetH(lua.LString(k), toLua(l, item))
		}
		return t
	}
	return lua.LNil
}

// scriptError is a failure of the script itself (syntax, runtime, deadline, wrong return type).
type scriptError struct{ err error }

func (e scriptError) Error() string { return e.err.Error() }

func evaluate(script string, obj map[string]any, openLibs bool) (Health, error) {
	l := newState(openLibs)
	defer l.Close()
	ctx, cancel := context.WithTimeout(context.Background(), scriptDeadline)
	defer cancel()
	l.SetContext(ctx)
	l.SetGlobal("obj", toLua(l, obj))

	fn, err := l.LoadString(script)
	if err == nil {
		l.Push(fn)
		err = l.PCall(0, lua.MultRet, nil)
	}
	if err != nil {
		var apiErr *lua.ApiError
		if errors.As(err, &apiErr) && apiErr.Type == lua.ApiErrorRun {
			apiErr.StackTrace = ""
		}
		return Health{}, scriptError{err}
	}
	ret := l.Get(-1)
	switch ret.Type() {
	case lua.LTNil:
		return Health{}, nil
	case lua.LTTable:
		encoded, err := luajson.Encode(ret)
		if err != nil {
			return Health{}, scriptError{err}
		}
		var h Health
		if err := json.Unmarshal(encoded, &h); err != nil {
			var typeErr *json.UnmarshalTypeError
			if errors.As(err, &typeErr) && typeErr.Value == "array" {
				return Health{}, nil
			}
			return Health{}, scriptError{err}
		}
		if !validStatuses[h.Status] {
			return Health{Status: "Unknown", Message: "Lua returned an invalid health status"}, nil
		}
		return h, nil
	}
	return Health{}, scriptError{fmt.Errorf("expect table output from Lua script, not %s", ret.Type().String())}
}

func readObject(data []byte) (map[string]any, error) {
	obj := map[string]any{}
	if err := yaml.Unmarshal(data, &obj); err != nil {
		return nil, err
	}
	return obj, nil
}

type testFile struct {
	Tests []struct {
		InputPath    string `json:"inputPath"`
		HealthStatus Health `json:"healthStatus"`
	} `json:"tests"`
}

type testResult struct {
	InputPath string `json:"inputPath"`
	Expected  Health `json:"expected"`
	Actual    Health `json:"actual"`
	Error     string `json:"error,omitempty"`
	OK        bool   `json:"ok"`
}

func runTests(dir string, openLibs bool, out io.Writer) (bool, error) {
	script, err := os.ReadFile(filepath.Join(dir, "health.lua"))
	if err != nil {
		return false, err
	}
	raw, err := os.ReadFile(filepath.Join(dir, "health_test.yaml"))
	if err != nil {
		return false, err
	}
	var tests testFile
	if err := yaml.UnmarshalStrict(raw, &tests); err != nil {
		return false, fmt.Errorf("health_test.yaml: %w", err)
	}
	if len(tests.Tests) == 0 {
		return false, fmt.Errorf("%s: no tests", filepath.Join(dir, "health_test.yaml"))
	}
	allOK := true
	enc := json.NewEncoder(out)
	for _, t := range tests.Tests {
		res := testResult{InputPath: t.InputPath, Expected: t.HealthStatus}
		data, err := os.ReadFile(filepath.Join(dir, t.InputPath))
		var obj map[string]any
		if err == nil {
			obj, err = readObject(data)
		}
		if err == nil {
			res.Actual, err = evaluate(string(script), obj, openLibs)
		}
		if err != nil {
			res.Error = err.Error()
		}
		res.OK = err == nil && res.Actual == res.Expected
		allOK = allOK && res.OK
		if err := enc.Encode(res); err != nil {
			return false, err
		}
	}
	return allOK, nil
}

func usage() {
	fmt.Fprintln(os.Stderr, "usage: argocd-health [--open-libs] run SCRIPT [OBJECT|-]\n       argocd-health [--open-libs] test DIR")
	os.Exit(64)
}

func main() {
	args := os.Args[1:]
	openLibs := false
	if len(args) > 0 && args[0] == "--open-libs" {
		openLibs, args = true, args[1:]
	}
	if len(args) < 2 {
		usage()
	}
	switch args[0] {
	case "run":
		if len(args) > 3 {
			usage()
		}
		script, err := os.ReadFile(args[1])
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(64)
		}
		var data []byte
		if len(args) == 3 && args[2] != "-" {
			data, err = os.ReadFile(args[2])
		} else {
			data, err = io.ReadAll(os.Stdin)
		}
		var obj map[string]any
		if err == nil {
			obj, err = readObject(data)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "object:", err)
			os.Exit(64)
		}
		h, err := evaluate(string(script), obj, openLibs)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(2)
		}
		// Both keys always, so callers need not know about omitempty.
		out, _ := json.Marshal(map[string]string{"status": h.Status, "message": h.Message})
		fmt.Println(string(out))
	case "test":
		if len(args) != 2 {
			usage()
		}
		ok, err := runTests(args[1], openLibs, os.Stdout)
		if err != nil {
			fmt.Fprintln(os.Stderr, err)
			os.Exit(64)
		}
		if !ok {
			os.Exit(1)
		}
	default:
		usage()
	}
}
