// Command render executes a Helm chart's templates the way `helm template` does, for tests and
// `make helm-template` on machines without a helm binary.
//
// It uses Go's text/template with the sprig function map (the same library Helm uses) and
// adds Helm's own functions: include, tpl, required, toYaml, fromYaml, toJson, fromJson, lookup
// (empty, as in `helm template`, unless -existing lists objects a cluster holds), and the
// .Values/.Release/.Chart/.Capabilities/.Template
// objects. Values arrive already coalesced and schema-checked (helm_template.py does that) as
// JSON, so numbers are float64 exactly as Helm's YAML-through-JSON decoding makes them.
//
//	render -chart helm/ultrakv -values merged.json -name ultrakv -namespace default
//
// Output: every rendered template file that is not empty, in path order, each as
// "---\n# Source: CHART/templates/FILE\n" followed by its text; with -notes, NOTES.txt alone.
package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"text/template"

	"github.com/Masterminds/sprig"
	"gopkg.in/yaml.v2"
)

// APIVersions answers .Capabilities.APIVersions.Has the way Helm's does.
type APIVersions []string

// Has reports whether the cluster serves an API group/version (or group/version/kind).
func (a APIVersions) Has(v string) bool {
	for _, x := range a {
		if x == v {
			return true
		}
	}
	return false
}

// KubeVersion mirrors Helm's chartutil.KubeVersion fields that templates read.
type KubeVersion struct {
	Version    string
	Major      string
	Minor      string
	GitVersion string
}

// Capabilities mirrors the parts of Helm's chartutil.Capabilities that templates read.
type Capabilities struct {
	KubeVersion KubeVersion
	APIVersions APIVersions
	HelmVersion map[string]string
}

// The objects -existing names: what `lookup` finds, as a cluster being upgraded holds them.
var existingObjects []map[string]interface{}

func main() {
	chartDir := flag.String("chart", "", "chart directory")
	valuesPath := flag.String("values", "", "coalesced values as JSON")
	name := flag.String("name", "ultrakv", "release name")
	namespace := flag.String("namespace", "default", "release namespace")
	kubeVersion := flag.String("kube-version", "v1.34.0", "Kubernetes version for .Capabilities")
	apiVersions := flag.String("api-versions", "", "comma-separated extra API versions")
	notes := flag.Bool("notes", false, "render NOTES.txt instead of the manifests")
	existing := flag.String("existing", "", "JSON list of objects `lookup` finds (as on an upgrade)")
	flag.Parse()
	if *existing != "" {
		raw, err := os.ReadFile(*existing)
		if err == nil {
			err = json.Unmarshal(raw, &existingObjects)
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "Error: -existing:", err)
			os.Exit(1)
		}
	}
	out, err := render(*chartDir, *valuesPath, *name, *namespace, *kubeVersion, *apiVersions, *notes)
	if err != nil {
		fmt.Fprintln(os.Stderr, "Error:", err)
		os.Exit(1)
	}
	os.Stdout.WriteString(out)
}

func render(chartDir, valuesPath, name, namespace, kubeVersion, apiVersions string, notes bool) (string, error) {
	chartMeta, err := readChart(chartDir)
	if err != nil {
		return "", err
	}
	values := map[string]interface{}{}
	if valuesPath != "" {
		raw, err := os.ReadFile(valuesPath)
		if err != nil {
			return "", err
		}
		if err := json.Unmarshal(raw, &values); err != nil {
			return "", fmt.Errorf("values %s: %w", valuesPath, err)
		}
	}
	chartName := chartMeta["Name"].(string)
	top := map[string]interface{}{
		"Values": values,
		"Release": map[string]interface{}{
			"Name": name, "Namespace": namespace, "Service": "Helm",
			"IsInstall": true, "IsUpgrade": false, "Revision": 1,
		},
		"Chart":        chartMeta,
		"Capabilities": capabilities(kubeVersion, apiVersions),
		"Files":        map[string]interface{}{},
	}

	paths, err := templatePaths(chartDir)
	if err != nil {
		return "", err
	}
	root := template.New("gotpl")
	root.Option("missingkey=zero") // Helm's lenient default; "<no value>" is blanked below
	funcs := funcMap(root)
	root.Funcs(funcs)
	for _, rel := range paths {
		text, err := os.ReadFile(filepath.Join(chartDir, rel))
		if err != nil {
			return "", err
		}
		full := chartName + "/" + rel
		if _, err := root.New(full).Funcs(funcs).Parse(string(text)); err != nil {
			return "", err
		}
	}

	var out strings.Builder
	for _, rel := range paths {
		base := filepath.Base(rel)
		isNotes := base == "NOTES.txt"
		if strings.HasPrefix(base, "_") || isNotes != notes {
			continue
		}
		full := chartName + "/" + rel
		scope := copyMap(top)
		scope["Template"] = map[string]interface{}{"Name": full, "BasePath": chartName + "/templates"}
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, full, scope); err != nil {
			return "", err
		}
		text := strings.ReplaceAll(buf.String(), "<no value>", "")
		if notes {
			out.WriteString(text)
			continue
		}
		if strings.TrimSpace(text) == "" {
			continue
		}
		fmt.Fprintf(&out, "---\n# Source: %s\n%s\n", full, strings.TrimRight(text, "\n"))
	}
	return out.String(), nil
}

// readChart loads Chart.yaml into the field names Helm's chart.Metadata exposes.
func readChart(chartDir string) (map[string]interface{}, error) {
	raw, err := os.ReadFile(filepath.Join(chartDir, "Chart.yaml"))
	if err != nil {
		return nil, err
	}
	var meta map[string]interface{}
	if err := yaml.Unmarshal(raw, &meta); err != nil {
		return nil, fmt.Errorf("Chart.yaml: %w", err)
	}
	out := map[string]interface{}{}
	for key, value := range meta {
		// Helm's Metadata struct: apiVersion -> APIVersion, appVersion -> AppVersion, ...
		field := strings.ToUpper(key[:1]) + key[1:]
		if key == "apiVersion" {
			field = "APIVersion"
		}
		out[field] = jsonable(value)
	}
	if _, ok := out["Name"].(string); !ok {
		return nil, errors.New("Chart.yaml: name is required")
	}
	return out, nil
}

func capabilities(kubeVersion, extra string) Capabilities {
	v := strings.TrimPrefix(kubeVersion, "v")
	parts := strings.SplitN(v, ".", 3)
	major, minor := parts[0], ""
	if len(parts) > 1 {
		minor = parts[1]
	}
	apis := APIVersions{"v1", "apps/v1", "batch/v1", "policy/v1", "networking.k8s.io/v1",
		"rbac.authorization.k8s.io/v1", "autoscaling/v2", "storage.k8s.io/v1"}
	for _, a := range strings.Split(extra, ",") {
		if a = strings.TrimSpace(a); a != "" {
			apis = append(apis, a)
		}
	}
	return Capabilities{
		KubeVersion: KubeVersion{Version: "v" + v, Major: major, Minor: minor, GitVersion: "v" + v},
		APIVersions: apis,
		HelmVersion: map[string]string{"Version": "v3.16.0"},
	}
}

func templatePaths(chartDir string) ([]string, error) {
	var paths []string
	err := filepath.Walk(filepath.Join(chartDir, "templates"), func(p string, info os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		if info.IsDir() {
			return nil
		}
		rel, err := filepath.Rel(chartDir, p)
		if err != nil {
			return err
		}
		paths = append(paths, filepath.ToSlash(rel))
		return nil
	})
	sort.Strings(paths)
	return paths, err
}

// funcMap is sprig's text functions plus Helm's own, as Helm's engine builds it.
func funcMap(root *template.Template) template.FuncMap {
	f := sprig.TxtFuncMap()
	delete(f, "env") // Helm removes these: a chart must not read the renderer's environment
	delete(f, "expandenv")
	f["toYaml"] = toYaml
	f["fromYaml"] = fromYaml
	f["toJson"] = toJSON
	f["fromJson"] = fromJSON
	f["required"] = func(msg string, v interface{}) (interface{}, error) {
		if v == nil {
			return v, errors.New(msg)
		}
		if s, ok := v.(string); ok && s == "" {
			return v, errors.New(msg)
		}
		return v, nil
	}
	f["lookup"] = func(apiVersion, kind, namespace, name string) (map[string]interface{}, error) {
		// `helm template` has no cluster to ask: empty, unless -existing says what one holds.
		for _, obj := range existingObjects {
			meta, _ := obj["metadata"].(map[string]interface{})
			if obj["apiVersion"] == apiVersion && obj["kind"] == kind && meta != nil && meta["name"] == name {
				if ns, ok := meta["namespace"].(string); !ok || ns == "" || ns == namespace {
					return obj, nil
				}
			}
		}
		return map[string]interface{}{}, nil
	}
	f["include"] = func(name string, data interface{}) (string, error) {
		var buf bytes.Buffer
		if err := root.ExecuteTemplate(&buf, name, data); err != nil {
			return "", err
		}
		return buf.String(), nil
	}
	f["tpl"] = func(text string, data interface{}) (string, error) {
		t, err := root.Clone()
		if err != nil {
			return "", err
		}
		t, err = t.New("tpl").Parse(text)
		if err != nil {
			return "", fmt.Errorf("tpl: %w", err)
		}
		var buf bytes.Buffer
		if err := t.Execute(&buf, data); err != nil {
			return "", fmt.Errorf("tpl: %w", err)
		}
		return strings.ReplaceAll(buf.String(), "<no value>", ""), nil
	}
	return f
}

// toYaml marshals like Helm (sigs.k8s.io/yaml goes through JSON, so keys come out sorted
// and numbers as JSON numbers) and drops the trailing newline.
func toYaml(v interface{}) string {
	raw, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	var generic interface{}
	if err := yaml.Unmarshal(raw, &generic); err != nil {
		return ""
	}
	data, err := yaml.Marshal(generic)
	if err != nil {
		return ""
	}
	return strings.TrimSuffix(string(data), "\n")
}

func fromYaml(s string) map[string]interface{} {
	var m map[string]interface{}
	if err := yaml.Unmarshal([]byte(s), &m); err != nil {
		return map[string]interface{}{"Error": err.Error()}
	}
	out, _ := jsonable(m).(map[string]interface{})
	return out
}

func toJSON(v interface{}) string {
	data, err := json.Marshal(v)
	if err != nil {
		return ""
	}
	return string(data)
}

func fromJSON(s string) map[string]interface{} {
	m := map[string]interface{}{}
	if err := json.Unmarshal([]byte(s), &m); err != nil {
		m["Error"] = err.Error()
	}
	return m
}

// jsonable turns yaml.v2's map[interface{}]interface{} into JSON-shaped maps and numbers.
func jsonable(v interface{}) interface{} {
	switch t := v.(type) {
	case map[interface{}]interface{}:
		m := map[string]interface{}{}
		for k, val := range t {
			m[fmt.Sprint(k)] = jsonable(val)
		}
		return m
	case map[string]interface{}:
		m := map[string]interface{}{}
		for k, val := range t {
			m[k] = jsonable(val)
		}
		return m
	case []interface{}:
		out := make([]interface{}, len(t))
		for i, val := range t {
			out[i] = jsonable(val)
		}
		return out
	case int:
		return float64(t)
	default:
		return v
	}
}

func copyMap(m map[string]interface{}) map[string]interface{} {
	out := make(map[string]interface{}, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}
